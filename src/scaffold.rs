//! `tidewatch new function`: a new function per consumer, wired everywhere
//! in one step — a crate under functions/ whose handler delivers each
//! matching event (a JSON line on stdout, to be replaced) with a test that
//! fails if it does not, its durable consumer and spec in the topology, the
//! workspace member, re-rendered deploy/, keda/ and knative/ manifests, and
//! a README section. `tidewatch up` runs it after the next build.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use tidewatch_runtime::topology::{self, FunctionSpec};

const CONSUMER_MARKER: &str = "    // `tidewatch new function` adds consumers above this line.";
const SPEC_MARKER: &str = "// `tidewatch new function` adds function specs above this line.";
const FUNCTION_MARKER: &str = "    // `tidewatch new function` adds functions above this line.";

#[derive(clap::Args)]
pub struct NewFunctionArgs {
    /// Function name: lowercase letters, digits and dashes (e.g. siem).
    name: String,
    /// Stream its durable consumer reads: raw, enriched, insights or dlq.
    #[arg(long, default_value = "insights")]
    from: String,
    /// Event types it handles; `*` matches anything (others are acked and skipped).
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

pub fn run(command: NewCommand) -> anyhow::Result<()> {
    let NewCommand::Function(args) = command;
    let name = args.name.as_str();
    if !name.starts_with(|c: char| c.is_ascii_lowercase())
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        bail!(
            "function name {name:?}: use lowercase letters, digits and dashes, starting with a letter"
        );
    }
    if topology::function(name).is_some() || topology::consumer(name).is_some() {
        bail!("a function or consumer named {name:?} already exists in the topology");
    }
    let stream = topology::stream(&args.from)
        .with_context(|| format!("--from {:?}: use raw, enriched, insights or dlq", args.from))?;
    let repo = &args.repo;
    let crate_dir = repo.join("functions").join(name);
    if crate_dir.exists() {
        bail!("{} already exists", crate_dir.display());
    }
    let constant = name.to_uppercase().replace('-', "_");
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

    // Topology: consumer, spec, and the list `up` and the renderer read.
    let topology_path = repo.join("runtime/src/topology.rs");
    let mut source = std::fs::read_to_string(&topology_path)
        .with_context(|| format!("read {}", topology_path.display()))?;
    for marker in [CONSUMER_MARKER, SPEC_MARKER, FUNCTION_MARKER] {
        if !source.contains(marker) {
            bail!(
                "{} lacks the line {marker:?}; add it back where it was",
                topology_path.display()
            );
        }
    }
    let description = format!("{name}: {} events matching {}", stream.key, args.types);
    source = source.replacen(
        CONSUMER_MARKER,
        &format!(
            "    function_consumer({name:?}, {:?}, {description:?}),\n{CONSUMER_MARKER}",
            stream.key
        ),
        1,
    );
    source = source.replacen(
        SPEC_MARKER,
        &format!(
            "pub const {constant}: FunctionSpec = FunctionSpec {{\n    name: {name:?},\n    consumer: {name:?},\n    output_stream: None,\n    binary: \"tidewatch-{name}\",\n    scale: scale_to_zero(100, 10),\n    concurrency: 64,\n}};\n\n{SPEC_MARKER}"
        ),
        1,
    );
    source = source.replacen(
        FUNCTION_MARKER,
        &format!("    {constant},\n{FUNCTION_MARKER}"),
        1,
    );
    std::fs::write(&topology_path, source)?;

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

    // The crate.
    std::fs::create_dir_all(crate_dir.join("src"))?;
    std::fs::write(crate_dir.join("Cargo.toml"), crate_manifest(name))?;
    std::fs::write(
        crate_dir.join("src/main.rs"),
        crate_main(name, &constant, &type_name, stream.key, &args.types),
    )?;
    // Best effort: the template's line widths depend on the names in it.
    let _ = std::process::Command::new("rustfmt")
        .args(["--edition", "2024"])
        .arg(crate_dir.join("src/main.rs"))
        .status();
    append_readme(repo, name, stream, &args.types)?;
    println!(
        "created functions/{name} (durable consumer {name:?} on {}), added it to the topology and the workspace",
        stream.name
    );

    if !args.no_render {
        let name: &'static str = Box::leak(name.to_string().into_boxed_str());
        let consumer = topology::ConsumerSpec {
            durable: name,
            stream: stream.key,
            description: Box::leak(description.into_boxed_str()),
            ..topology::CONSUMERS[0].clone()
        };
        let spec = FunctionSpec {
            name,
            consumer: name,
            output_stream: None,
            binary: Box::leak(format!("tidewatch-{name}").into_boxed_str()),
            scale: topology::scale_to_zero(100, 10),
            concurrency: 64,
        };
        render(repo, spec, consumer)?;
    }
    println!(
        "next: cargo build --workspace && cargo test -p tidewatch-{name}; `tidewatch up` runs it (kubectl apply -k keda/ on a cluster)"
    );
    Ok(())
}

/// Re-render the manifests with the new function added to the compiled
/// topology (this binary does not have it compiled in yet).
fn render(repo: &Path, spec: FunctionSpec, consumer: topology::ConsumerSpec) -> anyhow::Result<()> {
    let mut fns = crate::render::Functions::compiled();
    fns.functions.push(spec);
    fns.consumers.push(consumer);
    crate::render::write(repo, false, crate::render::render_with(&fns)?)
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

/// An event type `types` matches, and one it does not (none for a pattern
/// that matches everything), for the generated test.
fn example_types(types: &str) -> (String, Option<&'static str>) {
    let matching = types.replace('*', "example");
    let other = ["com.example.other", "dev.tidewatch.scaffold.other"]
        .into_iter()
        .find(|t| !topology::types::matches(types, t));
    (matching, other)
}

fn crate_main(name: &str, constant: &str, type_name: &str, stream: &str, types: &str) -> String {
    let (matching, other) = example_types(types);
    let other_check = match other {
        Some(other) => format!(
            "\n        assert!(matches!(function.handle(event(\"e-2\", {other:?}), &ctx).await, Outcome::Done));\n        assert!(!function.accepts({other:?}), \"other types are acked unread\");"
        ),
        None => String::new(),
    };
    format!(
        r#"//! {name}: delivers `{types}` events from the {stream} stream, read through
//! its own durable consumer `{name}`, as one JSON line each on stdout.
//! Scaffolded by `tidewatch new function`: replace `deliver` with what this
//! function does. Return `Outcome::RetryAfter` while a dependency is down
//! and `Outcome::Reject` for input that can never succeed (it goes to the
//! dead-letter stream); the input is acked once `handle` returns `Done`.

use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use clap::Parser;
use cloudevents::{{AttributesReader, Event}};
use tidewatch_runtime::binding::http::to_structured_json;
use tidewatch_runtime::host::{{FunctionArgs, Host}};
use tidewatch_runtime::topology::{{self, types}};
use tidewatch_runtime::{{Context, Function, Outcome}};

/// Event types this function handles (`*` matches any run of characters).
const TYPES: &str = {types:?};

/// Tidewatch function {name}.
#[derive(Parser)]
#[command(version)]
struct Args {{
    #[command(flatten)]
    function: FunctionArgs,
}}

/// Writes each event it handles to `out` (stdout in the binary).
struct {type_name}<W> {{
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
        types::matches(TYPES, event_type)
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
    let host = Host::start(&topology::{constant}, args.function).await?;
    host.run({type_name} {{ out: Mutex::new(std::io::stdout()) }}).await?;
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
        let function = {type_name} {{ out: Mutex::new(Vec::new()) }};
        let ctx = Context {{ function: {name:?}, delivery: 1, max_deliver: 5, stream_sequence: Some(1) }};
        assert!(matches!(function.handle(event("e-1", {matching:?}), &ctx).await, Outcome::Done));{other_check}
        let out = String::from_utf8(function.out.into_inner().expect("lock")).expect("utf-8");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "one line per matching event: {{out}}");
        let delivered: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON CloudEvent");
        assert_eq!((delivered["id"].as_str(), delivered["type"].as_str()), (Some("e-1"), Some({matching:?})));
    }}

    #[test]
    fn the_topology_knows_it() {{
        let spec = topology::function({name:?}).expect("in topology::FUNCTIONS");
        let consumer = topology::consumer(spec.consumer).expect("its durable consumer");
        assert_eq!(consumer.stream, {stream:?});
    }}
}}
"#
    )
}

fn append_readme(
    repo: &Path,
    name: &str,
    stream: &topology::StreamSpec,
    types: &str,
) -> anyhow::Result<()> {
    let path = repo.join("README.md");
    let mut readme = std::fs::read_to_string(&path).unwrap_or_default();
    const HEADING: &str = "## Functions added with `tidewatch new function`";
    if !readme.contains(HEADING) {
        readme.push_str(&format!("\n{HEADING}\n"));
    }
    readme.push_str(&format!(
        "\n### {name}\n\n`functions/{name}/`: handles `{types}` events from `{}` through its own durable consumer `{name}` \
         (it can replay the stream from the start). Runs under `tidewatch up`; on a cluster `keda/{name}.yaml` or \
         `knative/{name}.yaml`.\n",
        stream.name
    ));
    std::fs::write(&path, readme)?;
    Ok(())
}
