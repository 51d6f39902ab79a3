// The SIGBUS-recovering copy (see csrc/safe_copy.c for why it is C).
fn main() {
    println!("cargo:rerun-if-changed=csrc/safe_copy.c");
    cc::Build::new().file("csrc/safe_copy.c").flag_if_supported("-O2").compile("vfu_safe_copy");
}
