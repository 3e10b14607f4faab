//! `kubectl trellis`: the `trellis` command under kubectl's plugin name.

fn main() -> std::process::ExitCode {
    trellis_cli::main()
}
