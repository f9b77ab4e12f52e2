//! Links the Android shared library with 16 KB page alignment, which Google
//! Play requires (Android 15+ devices may use 16 KB pages). NDK r28 and newer
//! align this way by default; the flag keeps any toolchain or build path
//! (cargo-ndk, Gradle, plain cargo) from producing a 4 KB-aligned library.
//! It also packs the relocations (Android's format, which API 23+ loads):
//! about 0.2 MB of a library that is mostly tables of pointers otherwise.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("android") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-z,max-page-size=16384");
        println!("cargo:rustc-cdylib-link-arg=-Wl,--pack-dyn-relocs=android");
    }
}
