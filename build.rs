//! Embeds every `functions/*/function.toml` in the CLI. Provisioning,
//! rendering and `tidewatch up` need the whole list of functions and only
//! the CLI does those, so the list lives here as data rather than in the
//! runtime crate: adding a function rebuilds its own crate and the CLI,
//! and leaves the runtime and the other functions' binaries untouched.
//! `src/functions.rs` parses and checks the files (and tests that they do).

use std::error::Error;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let dir = root.join("functions");
    // The directory: a function added or removed; each file: one edited.
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let file = entry.path().join("function.toml");
        if file.is_file() {
            println!("cargo:rerun-if-changed={}", file.display());
            let name = entry.file_name().to_string_lossy().into_owned();
            files.push((format!("functions/{name}/function.toml"), file));
        }
    }
    files.sort();
    let mut out = String::from(
        "/// Every `functions/*/function.toml` as the build found it: (path in the repository, text).\n\
         pub const FUNCTION_FILES: &[(&str, &str)] = &[\n",
    );
    for (path, file) in &files {
        let file = file.to_str().ok_or("a non-UTF-8 path under functions/")?;
        out.push_str(&format!("    ({path:?}, include_str!({file:?})),\n"));
    }
    out.push_str("];\n");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("function_files.rs"), out)?;
    Ok(())
}
