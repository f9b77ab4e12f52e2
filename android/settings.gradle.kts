// The Confluo Android library: ./gradlew :confluo:assembleRelease builds the AAR.
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}

dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
        // rustls-platform-verifier's Kotlin part, which the Confluo library uses for
        // Android's trust store (its publishers serve it from GitHub, not Maven Central).
        maven("https://github.com/rustls/rustls-platform-verifier/raw/maven-archive/android-release-support/maven/") {
            content { includeGroup("rustls") }
        }
    }
}

rootProject.name = "confluo-android"
include(":confluo")
