//! [`collector_main`]: the whole `main` of a collector binary.

use std::process::ExitCode;

use clap::{Args, FromArgMatches};

use super::config::{CollectorConfig, CommonArgs};
use super::exit::{self, Failure};
use super::{Collector, component};
use crate::{shutdown, telemetry};

/// Parse flags, read the config file, let flags override it, then answer
/// `--check-host` or `--check-config`, or run until SIGTERM/SIGINT. Exit
/// codes are the table in [`super::exit`].
pub fn collector_main<C: Collector>() -> ExitCode {
    // clap names want 'static strings; this runs once per process.
    let binary: &'static str =
        Box::leak(format!("tidewatch-{}", component(C::NAME)).into_boxed_str());
    let command = clap::Command::new(binary).version(env!("CARGO_PKG_VERSION"));
    // The about comes last: deriving `Args` sets the struct's doc as one.
    let command = C::Args::augment_args(CommonArgs::augment_args(command))
        .mut_arg("config", |arg| arg.env(C::CONFIG_ENV))
        .about(C::ABOUT);
    let matches = command.get_matches();
    let common = CommonArgs::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let own = C::Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{binary}: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    runtime.block_on(main::<C>(binary, common, own))
}

async fn main<C: Collector>(binary: &str, common: CommonArgs, own: C::Args) -> ExitCode {
    let mut config = match &common.config {
        Some(path) => match C::Config::from_file(path) {
            Ok(config) => config,
            Err(e) => {
                eprintln!("{binary}: {e}");
                return ExitCode::from(exit::BAD_CONFIG);
            }
        },
        None => C::Config::default(),
    };
    config.common_mut().apply(&common);
    C::apply(own, &mut config);
    if common.check_host {
        // One plain line on stderr: `tidewatch up` shows it as the reason.
        return match C::check_host(&config).await {
            Ok(()) => ExitCode::from(exit::OK),
            Err(why) => {
                eprintln!("{why}");
                ExitCode::from(exit::UNSUPPORTED_HOST)
            }
        };
    }
    if common.check_config {
        return match config.check() {
            Ok(()) => ExitCode::from(exit::OK),
            Err(e) => {
                eprintln!("{binary}: {e}");
                ExitCode::from(exit::BAD_CONFIG)
            }
        };
    }
    let _telemetry = telemetry::init(&component(C::NAME));
    match super::run::<C>(config, shutdown::signal()).await {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            tracing::error!(error = %e, "collector failed");
            eprintln!("{binary}: {e}");
            e.kind().exit_code()
        }
    }
}
