//! Compiles the .proto files with protox (pure Rust, no system `protoc`) and
//! generates the prost types.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/io/cloudevents/v1/cloudevents.proto",
        "proto/tidewatch/v1/events.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    prost_build::Config::new()
        .enable_type_names()
        // Payloads render as readable JSON for `tail` and webhooks.
        .type_attribute(
            ".tidewatch.v1",
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default, rename_all = \"camelCase\")]",
        )
        .compile_fds(descriptors)?;
    Ok(())
}
