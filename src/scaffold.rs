//! `tidewatch new function`: a new function per consumer, wired everywhere
//! in one step — a crate under functions/ with its `function.toml` (its
//! consumer, scaling and the event types it handles: the data the CLI
//! provisions, renders and runs it from) and a handler that delivers each
//! matching event (a JSON line on stdout, to be replaced) with a test that
//! fails if it does not, the workspace member, re-rendered deploy/, keda/
//! and knative/ manifests, and a README section. Nothing else is edited:
//! the runtime and the other functions do not rebuild. `tidewatch up` runs
//! it once the CLI is rebuilt (it embeds every function.toml).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use tidewatch_runtime::spec::{self, ConsumerFile, FunctionFile};
use tidewatch_runtime::topology::{self, ScaleSpec};

#[derive(clap::Args)]
pub struct NewFunctionArgs {
    /// Function name: lowercase letters, digits and dashes (e.g. siem).
    name: String,
    /// Stream its durable consumer reads: raw, enriched, insights or dlq.
    #[arg(long, default_value = "insights")]
    from: String,
    /// Event types it handles, comma separated; `*` matches any run of
    /// characters (others are acked and skipped).
    #[arg(long, default_value = "*")]
    types: String,
    /// Repository root.
    #[arg(long, default_value = ".")]
    repo: PathBuf,
    /// Do not re-render the manifests (run `tidewatch render` after building).
    #[arg(long)]
    no_render: bool,
}

#[derive(clap::Subcommand)]
pub enum NewCommand {
    /// Scaffold a function with its own durable consumer.
    Function(NewFunctionArgs),
}

/// The spec a new function starts with: a consumer like the shipped
/// functions', and scaling for a modest, sink-bound load.
fn new_spec(name: &str, stream: &topology::StreamSpec, types: Vec<String>) -> FunctionFile {
    let description = format!(
        "{name}: {} events matching {}",
        stream.key,
        types.join(", ")
    );
    FunctionFile {
        name: name.to_string(),
        binary: format!("tidewatch-{name}"),
        reads: stream.key.to_string(),
        writes: None,
        types,
        concurrency: 64,
        scale: ScaleSpec {
            min_replicas: 0,
            max_replicas: 10,
            lag_threshold: 100,
            activation_lag_threshold: 0,
            container_concurrency: 10,
        },
        consumer: ConsumerFile {
            description,
            max_deliver: 5,
            ack_wait_secs: 30,
            max_ack_pending: 10_000,
        },
    }
}

pub fn run(command: NewCommand) -> anyhow::Result<()> {
    let NewCommand::Function(args) = command;
    let name = args.name.as_str();
    if let Some(problem) = spec::name_problem(name) {
        bail!("function name {problem}");
    }
    // Validated before anything is written: the patterns end up in TOML,
    // YAML and the generated test, where a quote or newline would inject.
    let types: Vec<String> = args
        .types
        .split(',')
        .map(|t| t.trim().to_string())
        .collect();
    if let Some(problem) = types.iter().find_map(|t| spec::type_pattern_problem(t)) {
        bail!("--types: {problem}");
    }
    let stream = topology::stream(&args.from)
        .with_context(|| format!("--from {:?}: use raw, enriched, insights or dlq", args.from))?;
    let repo = &args.repo;
    let functions_dir = repo.join("functions");
    let existing = spec::read_dir(&functions_dir)
        .with_context(|| format!("the functions in {}", functions_dir.display()))?;
    if existing.iter().any(|f| f.name == name) {
        bail!(
            "a function named {name:?} already exists in {}",
            functions_dir.display()
        );
    }
    let crate_dir = functions_dir.join(name);
    if crate_dir.exists() {
        bail!("{} already exists", crate_dir.display());
    }
    let spec_path = format!("functions/{name}/{}", spec::FILE_NAME);
    let file = new_spec(name, stream, types);
    file.check(&spec_path)?;
    let type_name: String = name
        .split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect();

    // Workspace member.
    let manifest_path = repo.join("Cargo.toml");
    let manifest = std::fs::read_to_string(&manifest_path)?;
    let members_start = manifest
        .find("members = [")
        .context("root Cargo.toml has no workspace members list")?;
    let members_end = members_start
        + manifest[members_start..]
            .find(']')
            .context("unterminated members list")?;
    let manifest = format!(
        "{}    \"functions/{name}\",\n{}",
        &manifest[..members_end],
        &manifest[members_end..]
    );
    std::fs::write(&manifest_path, manifest)?;

    // The crate, with its spec as data.
    std::fs::create_dir_all(crate_dir.join("src"))?;
    std::fs::write(
        repo.join(&spec_path),
        format!(
            "# {name}'s place in the pipeline, written by `tidewatch new function`. The binary\n\
             # embeds this file; the CLI reads every functions/*/function.toml at build time\n\
             # (fields: tidewatch_runtime::spec::FunctionFile).\n{}",
            file.to_toml(&spec_path)?
        ),
    )?;
    std::fs::write(crate_dir.join("Cargo.toml"), crate_manifest(name))?;
    std::fs::write(
        crate_dir.join("src/main.rs"),
        crate_main(name, &type_name, stream.key, &file.types),
    )?;
    // Best effort: the template's line widths depend on the names in it.
    let _ = std::process::Command::new("rustfmt")
        .args(["--edition", "2024"])
        .arg(crate_dir.join("src/main.rs"))
        .status();
    append_readme(repo, name, stream, &file.types)?;
    println!(
        "created functions/{name} (durable consumer {name:?} on {}, spec in {spec_path}) and added it to the workspace",
        stream.name
    );

    if !args.no_render {
        // The repository's functions as they now are, the new one included.
        let functions = spec::read_dir(&functions_dir)?;
        crate::render::write(
            repo,
            false,
            crate::render::render_with(&crate::render::Functions { functions })?,
        )?;
    }
    println!(
        "next: cargo build --workspace && cargo test -p tidewatch-{name}; `tidewatch up` runs it (kubectl apply -k keda/ on a cluster)"
    );
    Ok(())
}

fn crate_manifest(name: &str) -> String {
    format!(
        r#"[package]
name = "tidewatch-{name}"
version.workspace = true
edition.workspace = true
rust-version.workspace = true
license.workspace = true

[[bin]]
name = "tidewatch-{name}"
path = "src/main.rs"

[dependencies]
tidewatch-runtime.workspace = true
anyhow.workspace = true
clap.workspace = true
cloudevents-sdk.workspace = true
tokio.workspace = true
tracing.workspace = true

[dev-dependencies]
serde_json.workspace = true

[lints]
workspace = true
"#
    )
}

/// An event type the first pattern matches, and one no pattern matches
/// (none when they match everything), for the generated test. The patterns
/// are validated, so their `Debug` forms are plain string literals.
fn example_types(types: &[String]) -> (String, Option<&'static str>) {
    let matching = types
        .first()
        .map(String::as_str)
        .unwrap_or("*")
        .replace('*', "example");
    let other = ["com.example.other", "dev.tidewatch.scaffold.other"]
        .into_iter()
        .find(|t| !types.iter().any(|p| topology::types::matches(p, t)));
    (matching, other)
}

fn crate_main(name: &str, type_name: &str, stream: &str, types: &[String]) -> String {
    let (matching, other) = example_types(types);
    let other_check = match other {
        Some(other) => format!(
            "\n        assert!(matches!(function.handle(event(\"e-2\", {other:?}), &ctx).await, Outcome::Done));\n        assert!(!function.accepts({other:?}), \"other types are acked unread\");"
        ),
        None => String::new(),
    };
    let types = types.join("`, `");
    format!(
        r#"//! {name}: delivers `{types}` events from the {stream} stream, read through
//! its own durable consumer `{name}`, as one JSON line each on stdout.
//! Scaffolded by `tidewatch new function`: replace `deliver` with what this
//! function does. Return `Outcome::RetryAfter` while a dependency is down
//! and `Outcome::Reject` for input that can never succeed (it goes to the
//! dead-letter stream); the input is acked once `handle` returns `Done`.
//! What it reads, the types it handles and how it scales are in
//! function.toml.

use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use clap::Parser;
use cloudevents::{{AttributesReader, Event}};
use tidewatch_runtime::binding::http::to_structured_json;
use tidewatch_runtime::host::{{FunctionArgs, Host}};
use tidewatch_runtime::topology::FunctionSpec;
use tidewatch_runtime::{{Context, Function, Outcome}};

/// This function's place in the pipeline; the CLI reads the same file.
const SPEC: &str = include_str!("../function.toml");

/// Tidewatch function {name}.
#[derive(Parser)]
#[command(version)]
struct Args {{
    #[command(flatten)]
    function: FunctionArgs,
}}

/// Writes each event it handles to `out` (stdout in the binary).
struct {type_name}<W> {{
    /// Its spec: the event types it handles.
    spec: FunctionSpec,
    out: Mutex<W>,
}}

impl<W: Write> {type_name}<W> {{
    /// The event as a structured-mode JSON CloudEvent, one line.
    fn deliver(&self, event: &Event) -> Result<(), String> {{
        let mut line = to_structured_json(event).map_err(|e| e.to_string())?;
        line.push(b'\n');
        let mut out = self.out.lock().map_err(|_| "output lock poisoned".to_string())?;
        out.write_all(&line).and_then(|()| out.flush()).map_err(|e| e.to_string())
    }}
}}

impl<W: Write + Send + 'static> Function for {type_name}<W> {{
    fn accepts(&self, event_type: &str) -> bool {{
        self.spec.handles(event_type)
    }}

    async fn handle(&self, event: Event, _ctx: &Context) -> Outcome {{
        if !self.accepts(event.ty()) {{
            return Outcome::Done;
        }}
        match self.deliver(&event) {{
            Ok(()) => Outcome::Done,
            Err(e) => Outcome::retry(Duration::from_secs(1), format!("deliver {{}}: {{e}}", event.id())),
        }}
    }}
}}

#[tokio::main]
async fn main() -> anyhow::Result<()> {{
    let args = Args::parse();
    let spec = FunctionSpec::from_toml(SPEC)?;
    let host = Host::start(spec.clone(), args.function).await?;
    host.run({type_name} {{ spec, out: Mutex::new(std::io::stdout()) }}).await?;
    Ok(())
}}

#[cfg(test)]
mod tests {{
    use super::*;
    use cloudevents::{{EventBuilder, EventBuilderV10}};

    fn event(id: &str, ty: &str) -> Event {{
        EventBuilderV10::new().id(id).ty(ty).source("/tidewatch/test/node").build().expect("event")
    }}

    #[tokio::test]
    async fn delivers_each_matching_event_once_and_skips_the_others() {{
        let spec = FunctionSpec::from_toml(SPEC).expect("function.toml");
        let function = {type_name} {{ spec, out: Mutex::new(Vec::new()) }};
        let ctx = Context {{ function: {name:?}, delivery: 1, max_deliver: 5, stream_sequence: Some(1), subject: None }};
        assert!(matches!(function.handle(event("e-1", {matching:?}), &ctx).await, Outcome::Done));{other_check}
        let out = String::from_utf8(function.out.into_inner().expect("lock")).expect("utf-8");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "one line per matching event: {{out}}");
        let delivered: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON CloudEvent");
        assert_eq!((delivered["id"].as_str(), delivered["type"].as_str()), (Some("e-1"), Some({matching:?})));
    }}

    #[test]
    fn its_function_toml_is_valid() {{
        let spec = FunctionSpec::from_toml(SPEC).expect("function.toml");
        assert_eq!((spec.name, spec.consumer.durable, spec.consumer.stream), ({name:?}, {name:?}, {stream:?}));
    }}
}}
"#
    )
}

fn append_readme(
    repo: &Path,
    name: &str,
    stream: &topology::StreamSpec,
    types: &[String],
) -> anyhow::Result<()> {
    let types = types.join("`, `");
    let path = repo.join("README.md");
    let mut readme = std::fs::read_to_string(&path).unwrap_or_default();
    const HEADING: &str = "## Functions added with `tidewatch new function`";
    if !readme.contains(HEADING) {
        readme.push_str(&format!("\n{HEADING}\n"));
    }
    readme.push_str(&format!(
        "\n### {name}\n\n`functions/{name}/`: handles `{types}` events from `{}` through its own durable consumer `{name}` \
         (it can replay the stream from the start); its spec is `functions/{name}/function.toml`. Runs under `tidewatch up`; on a cluster `keda/{name}.yaml` or \
         `knative/{name}.yaml`.\n",
        stream.name
    ));
    std::fs::write(&path, readme)?;
    Ok(())
}
