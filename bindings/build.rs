//! Links the Android shared library with 16 KB page alignment, which Google
//! Play requires (Android 15+ devices may use 16 KB pages). NDK r28 and newer
//! align this way by default; the flag keeps any toolchain or build path
//! (cargo-ndk, Gradle, plain cargo) from producing a 4 KB-aligned library.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("android") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-z,max-page-size=16384");
    }
}
