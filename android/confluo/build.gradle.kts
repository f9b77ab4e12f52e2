// The Confluo Android library (AAR): the Rust core for each ABI built with
// cargo-ndk, the UniFFI-generated Kotlin (generated at build time with the
// pinned bindgen, never committed), and the idiomatic Kotlin API in
// src/main/kotlin, which is the same code the JVM tests compile.
plugins {
    id("com.android.library")
    id("org.jetbrains.kotlin.android")
    `maven-publish`
}

val repoRoot = rootProject.projectDir.parentFile
val rustOut = layout.buildDirectory.dir("rust")
val abis = listOf("arm64-v8a", "armeabi-v7a", "x86_64")

android {
    namespace = "dev.confluo"
    compileSdk = 35

    defaultConfig {
        minSdk = 24
        consumerProguardFiles("consumer-rules.pro")
        ndk { abiFilters += abis }
    }

    sourceSets["main"].apply {
        jniLibs.srcDir(rustOut.map { it.dir("jniLibs") })
        kotlin.srcDir(rustOut.map { it.dir("kotlin") })
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }

    publishing {
        singleVariant("release") {
            withSourcesJar()
        }
    }
}

kotlin {
    jvmToolchain(17)
}

/** Builds libconfluo_ffi.so for every ABI into build/rust/jniLibs/<abi>/ (needs the NDK and cargo-ndk). */
val cargoNdk by tasks.registering(Exec::class) {
    workingDir = repoRoot
    val args = mutableListOf("cargo", "ndk", "--platform", "24", "-o", rustOut.get().dir("jniLibs").asFile.path)
    abis.forEach { args += listOf("-t", it) }
    args += listOf("build", "--release", "-p", "confluo-ffi")
    commandLine(args)
    inputs.dir(repoRoot.resolve("core/src"))
    inputs.dir(repoRoot.resolve("bindings/src"))
    outputs.dir(rustOut.map { it.dir("jniLibs") })
}

/** Generates the Kotlin bindings from the built library with the pinned bindgen. */
val uniffiBindings by tasks.registering(Exec::class) {
    dependsOn(cargoNdk)
    workingDir = repoRoot
    val library = rustOut.get().file("jniLibs/arm64-v8a/libconfluo_ffi.so").asFile.path
    commandLine(
        "cargo", "uniffi-bindgen", "generate",
        "--library", library,
        "--language", "kotlin",
        "--no-format",
        "--out-dir", rustOut.get().dir("kotlin").asFile.path,
    )
    outputs.dir(rustOut.map { it.dir("kotlin") })
}

tasks.named("preBuild") { dependsOn(uniffiBindings) }

dependencies {
    // JNA's AAR carries its native dispatch library for every ABI.
    implementation("net.java.dev.jna:jna:5.18.1@aar")
    api("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.11.0")
}

publishing {
    publications {
        register<MavenPublication>("release") {
            groupId = "dev.confluo"
            artifactId = "confluo-android"
            version = providers.gradleProperty("confluo.version").get()
            afterEvaluate { from(components["release"]) }
            pom {
                name.set("Confluo for Android")
                description.set("Local-first sync for SQLite: the Confluo engine with an idiomatic Kotlin API")
            }
        }
    }
}
