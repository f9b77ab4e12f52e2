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
    }
}

rootProject.name = "confluo-android-todo"
include(":app")
include(":confluo")
project(":confluo").projectDir = file("../../android/confluo")
