//! The UniFFI binding generator at the version the FFI crate is built with.
fn main() {
    uniffi::uniffi_bindgen_main()
}
