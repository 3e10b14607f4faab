//! `sidecar/link-order.txt`, the order `sidecar/build.rs` links the
//! sidecar's functions in: `cargo xtask link-order` rewrites it, and every
//! full image build checks that it still names the build's functions.

use std::{fs, path::Path};

use anyhow::{Context, Result, bail};

use xtask::binaries;

use crate::{bench, images, paths};

/// Where the list lives, from the workspace root.
const LIST: &str = "sidecar/link-order.txt";

/// The share of the image build's listed functions a build must still
/// have, in percent: fewer, and the list was made for other symbol names.
const MIN_FOUND_PERCENT: usize = 75;

/// `cargo xtask link-order`: rewrites the list from callgrind runs of the
/// two builds users run: the release build the benchmarks measure and the
/// image build, each built as it is built elsewhere (their symbol names
/// differ). About 20 minutes, most of it the release build's link.
pub fn regenerate() -> Result<()> {
    eprintln!("==> building the release sidecar, as `cargo xtask bench` does");
    let release = binaries::release("trellis-sidecar", "trellis-sidecar", false)?;
    let image = images::sidecar_build()?;
    let mut args = vec!["link-order".to_owned()];
    for binary in [&release, &image] {
        args.push("--sidecar-binary".into());
        args.push(binary.display().to_string());
    }
    args.push("--out".into());
    args.push(paths::workspace().join(LIST).display().to_string());
    bench::run(&args)?;
    eprintln!(
        "==> rebuild to link by the new list (`cargo xtask bench sidecar` rebuilds the release sidecar)"
    );
    Ok(())
}

/// Fails when the list names too few of the functions of `image_sidecar`,
/// the image build of the sidecar: a toolchain, dependency or large code
/// change renamed them, and the sidecar's code is no longer laid out.
pub fn check(image_sidecar: &Path) -> Result<()> {
    let path = paths::workspace().join(LIST);
    let list = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    check_list(&list, image_sidecar)
}

/// [`check`] of the list `list`.
fn check_list(list: &str, image_sidecar: &Path) -> Result<()> {
    let listed = section(list, "image");
    if listed.is_empty() {
        bail!("{LIST} has no `# build: image` section: run `cargo xtask link-order` and commit it");
    }
    let functions = binaries::functions(image_sidecar)?;
    let found = listed
        .iter()
        .filter(|name| functions.contains_key(**name))
        .count();
    eprintln!(
        "    {LIST}: {found} of the {} functions it lists for the image build are in it",
        listed.len()
    );
    if found * 100 < listed.len() * MIN_FOUND_PERCENT {
        bail!(
            "{LIST} is stale: the image build has {found} of the {} functions it lists (under {MIN_FOUND_PERCENT} %), \
             so the sidecar's code is no longer laid out; run `cargo xtask link-order` (about 20 minutes) and commit it",
            listed.len()
        );
    }
    Ok(())
}

/// The names under `# build: <build>`, up to the next section.
fn section<'a>(list: &'a str, build: &str) -> Vec<&'a str> {
    let header = format!("# build: {build}");
    list.lines()
        .map(str::trim)
        .skip_while(|l| *l != header)
        .skip(1)
        .take_while(|l| !l.starts_with("# build: "))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{check_list, section};

    /// Forty functions of this test binary, as the linker names them.
    fn own_functions() -> (std::path::PathBuf, Vec<String>) {
        let exe = std::env::current_exe().unwrap();
        let names = xtask::binaries::functions(&exe)
            .unwrap()
            .into_keys()
            .take(40)
            .collect();
        (exe, names)
    }

    #[test]
    fn a_list_naming_the_builds_functions_passes_and_a_stale_one_fails() {
        let (exe, names) = own_functions();
        assert_eq!(names.len(), 40);
        let fresh = format!("# build: image\n{}\n", names.join("\n"));
        check_list(&fresh, &exe).unwrap();
        // A dependency bump renames functions: a third of them gone.
        let renamed: Vec<String> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                if i % 3 == 0 {
                    format!("{n}_renamed")
                } else {
                    n.clone()
                }
            })
            .collect();
        let stale = format!("# build: image\n{}\n", renamed.join("\n"));
        let err = check_list(&stale, &exe).unwrap_err().to_string();
        assert!(
            err.contains("is stale") && err.contains("cargo xtask link-order"),
            "{err}"
        );
        let without = format!("# build: release\n{}\n", names.join("\n"));
        assert!(check_list(&without, &exe).is_err());
    }

    #[test]
    fn a_section_is_the_names_under_its_header() {
        let list = "# how it was made\n# build: release\na\nb\n# build: image\nc\n\nd\n";
        assert_eq!(section(list, "release"), ["a", "b"]);
        assert_eq!(section(list, "image"), ["c", "d"]);
        assert!(section(list, "debug").is_empty());
    }
}
