//! The functions the CLI provisions, renders and runs under `tidewatch up`:
//! every `functions/*/function.toml`, embedded by build.rs and checked here
//! (the runtime crate keeps no list, see `tidewatch_runtime::spec`).

use std::sync::OnceLock;

use anyhow::Context as _;
use tidewatch_runtime::spec;
use tidewatch_runtime::topology::{ConsumerSpec, FunctionSpec};

include!(concat!(env!("OUT_DIR"), "/function_files.rs"));

/// Every function, checked, in pipeline order; parsed once per process.
pub fn all() -> anyhow::Result<&'static [FunctionSpec]> {
    static LIST: OnceLock<Vec<FunctionSpec>> = OnceLock::new();
    if let Some(list) = LIST.get() {
        return Ok(list);
    }
    let list = spec::function_list(FUNCTION_FILES)
        .context("the functions/*/function.toml this CLI was built with")?;
    Ok(LIST.get_or_init(|| list))
}

/// Every function's durable consumer, in the same order.
pub fn consumers() -> anyhow::Result<Vec<ConsumerSpec>> {
    Ok(all()?.iter().map(|f| f.consumer.clone()).collect())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn the_embedded_list_is_every_function_toml_and_each_is_valid() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let on_disk =
            spec::read_dir(&repo.join("functions")).expect("functions/*/function.toml parse");
        assert_eq!(all().expect("embedded files parse"), on_disk.as_slice());
        for (path, text) in FUNCTION_FILES {
            assert_eq!(
                std::fs::read_to_string(repo.join(path))
                    .expect("read")
                    .as_str(),
                *text,
                "{path}"
            );
        }
        let names: Vec<&str> = on_disk.iter().map(|f| f.name).collect();
        for name in ["enrich", "correlate", "export"] {
            assert!(names.contains(&name), "{name} in {names:?}");
        }
    }

    /// The runtime crate and the function crates must not read the list:
    /// that is what keeps adding a function from rebuilding them.
    #[test]
    fn only_the_cli_reads_every_function_toml() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut sources = Vec::new();
        let mut stack = vec![repo.join("runtime"), repo.join("functions")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).expect("read dir").flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs")
                    && !path.components().any(|c| c.as_os_str() == "tests")
                {
                    sources.push(path);
                }
            }
        }
        assert!(!sources.is_empty());
        for path in sources {
            let text = std::fs::read_to_string(&path).expect("read");
            for needle in [
                "pub const FUNCTIONS",
                "pub const CONSUMERS",
                "FUNCTION_FILES",
                "../functions",
            ] {
                // Tests may read the repository's files; the code may not.
                let code = text.split("#[cfg(test)]").next().unwrap_or_default();
                assert!(
                    !code.contains(needle),
                    "{} contains {needle:?}",
                    path.display()
                );
            }
        }
    }
}
