// The Android todo app; it uses the Confluo library module as a project dependency.
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

rootProject.name = "confluo-android-todo"
include(":app")
include(":confluo")
project(":confluo").projectDir = file("../../android/confluo")
