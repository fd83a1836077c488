//! Compiles the BPF programs in ../../ebpf with clang (CO-RE, BTF) into
//! $OUT_DIR/tidewatch.bpf.o, which the collector embeds.

use std::path::PathBuf;
use std::process::Command;

const PACKAGES: &str = "clang libbpf-dev (Debian/Ubuntu: apt-get install clang libbpf-dev)";

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let ebpf = manifest.join("../../ebpf");
    let source = ebpf.join("tidewatch.bpf.c");
    let include = ebpf.join("include");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("tidewatch.bpf.o");
    println!("cargo:rerun-if-changed={}", source.display());
    println!(
        "cargo:rerun-if-changed={}",
        include.join("vmlinux.h").display()
    );
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-env-changed=LIBBPF_INCLUDE");

    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86",
        Ok("aarch64") => "arm64",
        Ok(other) => panic!(
            "the eBPF collector's programs are built for x86_64 and aarch64 (their vmlinux.h); not for {other}"
        ),
        Err(_) => "x86",
    };
    let libbpf_include = std::env::var("LIBBPF_INCLUDE").unwrap_or_else(|_| "/usr/include".into());
    if !PathBuf::from(&libbpf_include)
        .join("bpf/bpf_helpers.h")
        .exists()
    {
        panic!(
            "building the eBPF collector needs the libbpf headers ({libbpf_include}/bpf/bpf_helpers.h not found): install {PACKAGES}, or set LIBBPF_INCLUDE to the directory holding bpf/bpf_helpers.h"
        );
    }
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let output = Command::new(&clang)
        // -mcpu=v3: atomic fetch-and-add with a result (kernel >= 5.12).
        .args(["-g", "-O2", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror"])
        .arg(format!("-D__TARGET_ARCH_{arch}"))
        .arg("-I")
        .arg(&include)
        .arg("-I")
        .arg(&libbpf_include)
        .arg("-c")
        .arg(&source)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap_or_else(|e| {
            panic!("building the eBPF collector needs clang ({clang}: {e}): install {PACKAGES}, or set CLANG")
        });
    if !output.status.success() {
        panic!(
            "clang failed to compile {}:\n{}{}",
            source.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
