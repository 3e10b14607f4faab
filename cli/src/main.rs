//! `trellis`: see [`trellis_cli`].

fn main() -> std::process::ExitCode {
    trellis_cli::main()
}
