//! `tidewatch-collector-ebpf`: kernel events into JetStream. Flags, config
//! and exit codes: the runtime's collector host (`tidewatch_runtime::collector`).

fn main() -> std::process::ExitCode {
    tidewatch_runtime::collector::collector_main::<tidewatch_collector_ebpf::Ebpf>()
}
