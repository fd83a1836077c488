//! export: ships insights to where people look. This version writes each
//! insight as one JSON line to stdout (readable: attributes plus the decoded
//! protobuf payload), flushed per line so log shippers see it at once.
//! A write failure (closed pipe, full disk) retries the insight rather than
//! losing it.

use std::io::Write;
use std::time::Duration;

use clap::Parser;
use cloudevents::Event;
use tidewatch_runtime::event::to_json;
use tidewatch_runtime::host::{FunctionArgs, Host};
use tidewatch_runtime::topology;
use tidewatch_runtime::{Context, Function, Outcome};

/// Tidewatch export function: insights → JSON lines on stdout.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    function: FunctionArgs,
}

struct Stdout;

impl Function for Stdout {
    async fn handle(&self, event: Event, _ctx: &Context) -> Outcome {
        let line = to_json(&event).to_string();
        let mut out = std::io::stdout().lock();
        match writeln!(out, "{line}").and_then(|_| out.flush()) {
            Ok(()) => Outcome::Done,
            Err(e) => Outcome::retry(Duration::from_secs(1), format!("stdout: {e}")),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let host = Host::start(&topology::EXPORT, args.function).await?;
    host.run(Stdout).await?;
    Ok(())
}
