// Build script: only makes cargo relink the guest when its linker script changes
// (the script itself is passed to the linker from .cargo/config.toml).
fn main() {
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=.cargo/config.toml");
}
