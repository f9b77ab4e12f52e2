plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
    id("org.jetbrains.kotlin.plugin.compose")
}

android {
    namespace = "dev.confluo.todo"
    compileSdk = 35

    defaultConfig {
        applicationId = "dev.confluo.todo"
        minSdk = 24
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
    }

    buildTypes {
        release {
            isMinifyEnabled = true
            proguardFiles(getDefaultProguardFile("proguard-android-optimize.txt"))
        }
    }

    buildFeatures { compose = true }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }

    testOptions {
        unitTests.all { it.useJUnitPlatform() }
    }
}

// The repository from this module's own folder (examples/android-todo/app).
val repoRoot: File = projectDir.resolve("../../..").canonicalFile

// The todo logic's tests run on the JVM against the host-built library and a
// real server, which the library module's cargoHost task builds.
tasks.withType<Test>().configureEach {
    dependsOn(":confluo:cargoHost")
    systemProperty("jna.library.path", repoRoot.resolve("target/debug").path)
    environment("CONFLUO_SERVER_BIN", repoRoot.resolve("target/debug/confluo-server").path)
}

kotlin {
    jvmToolchain(17)
}

dependencies {
    implementation(project(":confluo"))
    implementation(platform("androidx.compose:compose-bom:2024.12.01"))
    implementation("androidx.compose.material3:material3")
    implementation("androidx.compose.material:material-icons-extended")
    implementation("androidx.activity:activity-compose:1.9.3")
    implementation("androidx.lifecycle:lifecycle-viewmodel-compose:2.8.7")
    implementation("androidx.lifecycle:lifecycle-runtime-compose:2.8.7")
    implementation("androidx.lifecycle:lifecycle-process:2.8.7")
    implementation("androidx.work:work-runtime-ktx:2.10.0")
    implementation("androidx.core:core-ktx:1.15.0")
    implementation("androidx.datastore:datastore-preferences:1.1.1")

    // The versions scripts/test-kotlin.sh (scripts/jvm-tools.sh) fetches.
    testImplementation(platform("org.junit:junit-bom:5.13.4"))
    testImplementation("org.junit.jupiter:junit-jupiter")
    testRuntimeOnly("org.junit.platform:junit-platform-launcher")
    testImplementation("net.java.dev.jna:jna:5.18.1")
}
