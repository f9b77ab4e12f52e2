// swift-tools-version:5.9
// Confluo's Swift package. Add it by URL; the product is `Confluo`.
//
// On Apple platforms the Rust core comes as ConfluoFFIC.xcframework
// (built by ios/build-xcframework.sh; a URL and checksum for releases): a
// binary target's name must be its XCFramework's name. On
// Linux the package builds against the host-built library, so the same
// Swift code is tested there (scripts/test-swift.sh generates the FFI
// sources and passes the library path).
import PackageDescription

#if os(Linux)
let ffi: Target = .systemLibrary(name: "ConfluoFFIC", path: "ios/Generated/ConfluoFFIC")
// The privacy manifest is for Apple's App Store only.
let privacy: [Resource] = []
let notShipped = ["PrivacyInfo.xcprivacy"]
#else
// A release replaces the path with
// .binaryTarget(name: "ConfluoFFIC", url: "<release>/ConfluoFFIC.xcframework.zip", checksum: "<ios/build-xcframework.sh --release>")
let ffi: Target = .binaryTarget(name: "ConfluoFFIC", path: "ios/ConfluoFFIC.xcframework")
let privacy: [Resource] = [.copy("PrivacyInfo.xcprivacy")]
let notShipped: [String] = []
#endif

let package = Package(
    name: "Confluo",
    platforms: [.iOS(.v16), .macOS(.v13)],
    products: [
        .library(name: "Confluo", targets: ["Confluo"]),
    ],
    targets: [
        ffi,
        // The UniFFI-generated Swift, produced from the built library.
        // The core checks https servers with the platform's trust store.
        .target(name: "ConfluoFFI", dependencies: ["ConfluoFFIC"], path: "ios/Generated/ConfluoFFI",
                linkerSettings: [
                    .linkedFramework("Security", .when(platforms: [.iOS, .macOS])),
                    .linkedFramework("CoreFoundation", .when(platforms: [.iOS, .macOS])),
                ]),
        // The idiomatic API apps use.
        .target(name: "Confluo", dependencies: ["ConfluoFFI"], path: "ios/Sources/Confluo",
                exclude: notShipped, resources: privacy),
        // The tests also implement the generated callback protocols directly.
        .testTarget(name: "ConfluoTests", dependencies: ["Confluo", "ConfluoFFI"], path: "ios/Tests/ConfluoTests"),
    ]
)
