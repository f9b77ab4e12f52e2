//! Which certificate authorities the device trusts for https.
//!
//! Phones check servers with the platform's own trust store, through
//! rustls-platform-verifier: CAs a user or an enterprise installed work as
//! they do for the platform's own HTTP stack (on Android, as far as the
//! app's network security config allows them). Everywhere else (servers,
//! desktops, CI) the bundled Mozilla roots are used, which need nothing from
//! the machine.

use crate::error::{Error, Result};

/// The roots the device's HTTP agent verifies servers with.
pub(crate) fn root_certs() -> ureq::tls::RootCerts {
    #[cfg(any(target_os = "android", target_vendor = "apple"))]
    return ureq::tls::RootCerts::PlatformVerifier;
    #[cfg(not(any(target_os = "android", target_vendor = "apple")))]
    return ureq::tls::RootCerts::WebPki;
}

/// Android's verifier calls into the JVM, so it needs the app's `Context`
/// first (`PlatformTrust.initialize`, run at app startup).
#[cfg(target_os = "android")]
static PLATFORM_STORE_READY: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Records that the platform's trust store can be used (Android: the
/// verifier has the app's `Context`). Elsewhere it always can.
pub fn platform_store_ready() {
    #[cfg(target_os = "android")]
    PLATFORM_STORE_READY.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Refuses an https request the trust store cannot check yet, with a typed
/// error that says what to do (the verifier would panic instead).
pub(crate) fn check_ready(server_url: &str) -> Result<()> {
    let https = server_url
        .get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"));
    if https && !ready() {
        return Err(Error::InvalidInput(
            "https needs Android's trust store, which is not initialized yet: \
             call dev.confluo.PlatformTrust.initialize(context) at startup \
             (the library's androidx.startup initializer does, unless the app \
             removed it)"
                .into(),
        ));
    }
    Ok(())
}

#[cfg(target_os = "android")]
fn ready() -> bool {
    PLATFORM_STORE_READY.load(std::sync::atomic::Ordering::SeqCst)
}

#[cfg(not(target_os = "android"))]
fn ready() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_and_http_are_allowed_where_no_initialization_is_needed() {
        assert!(check_ready("https://sync.example").is_ok());
        assert!(check_ready("HTTPS://sync.example").is_ok());
        assert!(check_ready("http://127.0.0.1:1").is_ok());
    }

    #[cfg(not(any(target_os = "android", target_vendor = "apple")))]
    #[test]
    fn the_bundled_roots_serve_this_platform() {
        assert!(matches!(root_certs(), ureq::tls::RootCerts::WebPki));
    }
}
