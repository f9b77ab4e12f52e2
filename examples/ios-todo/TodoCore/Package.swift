// swift-tools-version:5.9
// The todo app's logic, free of SwiftUI and UIKit: the app target and the
// Linux tests both use it.
import PackageDescription

let package = Package(
    name: "TodoCore",
    platforms: [.iOS(.v17), .macOS(.v14)],
    products: [.library(name: "TodoCore", targets: ["TodoCore"])],
    dependencies: [.package(name: "Confluo", path: "../../..")],
    targets: [
        .target(name: "TodoCore", dependencies: [.product(name: "Confluo", package: "Confluo")]),
        .testTarget(name: "TodoCoreTests", dependencies: ["TodoCore"]),
    ]
)
