//! `tidewatch-collector-k8s`: Kubernetes changes into JetStream, pod
//! metadata into KV. Flags, config and exit codes: the runtime's collector
//! host (`tidewatch_runtime::collector`).

fn main() -> std::process::ExitCode {
    tidewatch_runtime::collector::collector_main::<tidewatch_collector_k8s::K8s>()
}
