//! Android only: hands the app's `Context` to rustls-platform-verifier, so
//! that https servers are checked against Android's own trust store (user
//! and enterprise CAs the app's network security config allows included).
//! The Kotlin side calls this once at startup (`dev.confluo.PlatformTrust`,
//! run by the library's androidx.startup initializer); until then the
//! engine refuses https with a clear error instead of panicking in the
//! verifier.

use jni::errors::ThrowRuntimeExAndDefault;
use jni::objects::{JClass, JObject};
use jni::EnvUnowned;

/// `PlatformTrust.nativeInitialize(context)`: a static native method of a Kotlin
/// object. A JNI failure becomes a `RuntimeException` in Kotlin, never a
/// panic across the boundary.
#[no_mangle]
pub extern "system" fn Java_dev_confluo_PlatformTrust_nativeInitialize<'caller>(
    mut env: EnvUnowned<'caller>,
    _class: JClass<'caller>,
    context: JObject<'caller>,
) {
    env.with_env(|env| -> jni::errors::Result<()> {
        rustls_platform_verifier::android::init_with_env(env, context)?;
        confluo_core::trust::platform_store_ready();
        Ok(())
    })
    .resolve::<ThrowRuntimeExAndDefault>()
}
