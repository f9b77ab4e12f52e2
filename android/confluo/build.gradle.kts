// The Confluo Android library (AAR): the Rust core for each ABI built with
// cargo-ndk, the UniFFI-generated Kotlin (generated at build time with the
// pinned bindgen, never committed), and the idiomatic Kotlin API in
// src/main/kotlin, which is the same code the JVM tests compile.
import javax.inject.Inject
import org.gradle.process.ExecOperations

plugins {
    id("com.android.library")
    id("org.jetbrains.kotlin.android")
    `maven-publish`
}

// The repository from this module's own folder (android/confluo), so the
// paths hold whichever build includes the module: android/ or an example app.
val repoRoot: File = projectDir.resolve("../..").canonicalFile
// The ABIs cargo-ndk builds and the AAR packages (ndk.abiFilters): one list.
val targetAbis = listOf("arm64-v8a", "armeabi-v7a", "x86_64")
// NDK r28 and newer link with 16 KB page alignment by default (Google Play
// requires it); bindings/build.rs passes the flag as well. cargo-ndk uses
// this same NDK (ANDROID_NDK_HOME below).
val pinnedNdkVersion = "28.0.13004108"

// The Kotlin half of rustls-platform-verifier (Android's certificate checks for
// the engine's https) at the version Cargo.lock pins for its Rust half: the two
// must match. Its Maven repository is declared in settings.gradle.kts.
val platformVerifierVersion: String = repoRoot.resolve("Cargo.lock").readLines().let { lines ->
    val at = lines.indexOfFirst { it.trim() == "name = \"rustls-platform-verifier-android\"" }
    check(at >= 0) { "rustls-platform-verifier-android is not in Cargo.lock" }
    lines[at + 1].substringAfter('"').substringBefore('"')
}

/** Builds libconfluo_ffi.so for each ABI into <outputDir>/<abi>/ (needs the NDK and cargo-ndk). */
abstract class CargoNdkTask : DefaultTask() {
    @get:InputFiles abstract val rustSources: ConfigurableFileCollection
    @get:Input abstract val abis: ListProperty<String>
    @get:Internal abstract val workspace: DirectoryProperty
    @get:Internal abstract val ndkDirectory: DirectoryProperty
    @get:OutputDirectory abstract val outputDir: DirectoryProperty
    @get:Inject abstract val exec: ExecOperations

    @TaskAction
    fun build() {
        exec.exec {
            workingDir = workspace.get().asFile
            environment("ANDROID_NDK_HOME", ndkDirectory.get().asFile.path)
            commandLine(
                listOf("cargo", "ndk", "--platform", "24", "-o", outputDir.get().asFile.path) +
                    abis.get().flatMap { listOf("-t", it) } +
                    listOf("build", "--release", "-p", "confluo-ffi"),
            )
        }
    }
}

/** Generates the Kotlin bindings from the built library with the pinned bindgen. */
abstract class UniffiBindingsTask : DefaultTask() {
    @get:InputFile abstract val library: RegularFileProperty
    @get:InputFile abstract val config: RegularFileProperty
    @get:Internal abstract val workspace: DirectoryProperty
    @get:OutputDirectory abstract val outputDir: DirectoryProperty
    @get:Inject abstract val exec: ExecOperations

    @TaskAction
    fun generate() {
        outputDir.get().asFile.deleteRecursively()
        exec.exec {
            workingDir = workspace.get().asFile
            commandLine(
                "cargo", "uniffi-bindgen", "generate",
                "--library", library.get().asFile.path,
                "--language", "kotlin", "--no-format",
                "--out-dir", outputDir.get().asFile.path,
            )
        }
    }
}

val cargoNdk = tasks.register<CargoNdkTask>("cargoNdk") {
    rustSources.from(
        fileTree(repoRoot.resolve("core/src")),
        fileTree(repoRoot.resolve("bindings/src")),
        repoRoot.resolve("bindings/build.rs"),
        repoRoot.resolve("Cargo.toml"),
        repoRoot.resolve("Cargo.lock"),
        repoRoot.resolve("core/Cargo.toml"),
        repoRoot.resolve("bindings/Cargo.toml"),
    )
    abis.set(targetAbis)
    workspace.set(repoRoot)
    ndkDirectory.set(androidComponents.sdkComponents.ndkDirectory)
    outputDir.set(layout.buildDirectory.dir("rust/jniLibs"))
}

val uniffiBindings = tasks.register<UniffiBindingsTask>("uniffiBindings") {
    library.set(cargoNdk.flatMap { it.outputDir.file("arm64-v8a/libconfluo_ffi.so") })
    config.set(repoRoot.resolve("bindings/uniffi.toml"))
    workspace.set(repoRoot)
    outputDir.set(layout.buildDirectory.dir("generated/uniffi/kotlin"))
}

/**
 * Builds the host's libconfluo_ffi and confluo-server for the JVM unit tests,
 * which run the same Kotlin on this machine (JNA loads the host library).
 */
abstract class CargoHostTask : DefaultTask() {
    @get:Internal abstract val workspace: DirectoryProperty
    @get:Inject abstract val exec: ExecOperations

    @TaskAction
    fun build() {
        exec.exec {
            workingDir = workspace.get().asFile
            commandLine("cargo", "build", "-p", "confluo-ffi", "-p", "confluo-server")
        }
    }
}

val cargoHost = tasks.register<CargoHostTask>("cargoHost") {
    workspace.set(repoRoot)
    // Cargo decides itself what is out of date.
    outputs.upToDateWhen { false }
}

// JUnit 5 on the JVM against the host library and a real server, as
// scripts/test-kotlin.sh runs them without Gradle.
tasks.withType<Test>().configureEach {
    dependsOn(cargoHost)
    systemProperty("jna.library.path", repoRoot.resolve("target/debug").path)
    environment("CONFLUO_SERVER_BIN", repoRoot.resolve("target/debug/confluo-server").path)
}

android {
    namespace = "dev.confluo"
    compileSdk = 35
    ndkVersion = pinnedNdkVersion

    defaultConfig {
        minSdk = 24
        consumerProguardFiles("consumer-rules.pro")
        ndk { abiFilters += targetAbis }
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }

    testOptions {
        unitTests.all { it.useJUnitPlatform() }
    }

    // Code that needs the Android SDK (the Logcat logger, PlatformTrust): only this build
    // compiles it; the JVM tests compile src/main/kotlin alone.
    sourceSets {
        getByName("main") {
            kotlin.srcDir("src/android/kotlin")
        }
    }

    publishing {
        singleVariant("release") {
            withSourcesJar()
        }
    }
}

// The generated code and libraries join each variant's sources through the
// tasks that make them, so Gradle runs (and reruns) those tasks as needed.
androidComponents {
    onVariants { variant ->
        variant.sources.kotlin?.addGeneratedSourceDirectory(uniffiBindings, UniffiBindingsTask::outputDir)
        variant.sources.jniLibs?.addGeneratedSourceDirectory(cargoNdk, CargoNdkTask::outputDir)
    }
}

kotlin {
    jvmToolchain(17)
}

dependencies {
    // JNA's AAR carries its native dispatch library for every ABI.
    implementation("net.java.dev.jna:jna:5.18.1@aar")
    api("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.11.0")
    // PlatformTrust: Android's trust store for https, set up at app startup.
    implementation("androidx.startup:startup-runtime:1.2.0")
    implementation("rustls:rustls-platform-verifier:$platformVerifierVersion")

    // The versions scripts/test-kotlin.sh (scripts/jvm-tools.sh) fetches.
    testImplementation(platform("org.junit:junit-bom:5.13.4"))
    testImplementation("org.junit.jupiter:junit-jupiter")
    testRuntimeOnly("org.junit.platform:junit-platform-launcher")
    testImplementation("org.jetbrains.kotlinx:kotlinx-coroutines-test:1.11.0")
    // JNA's jar carries the desktop dispatch libraries the JVM tests need.
    testImplementation("net.java.dev.jna:jna:5.18.1")
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
