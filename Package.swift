// swift-tools-version:5.9
import PackageDescription

let package = Package(
    name: "syncbn",
    products: [
        .library(name: "Collectives", targets: ["Collectives"]),
        .library(name: "CollectivesMPI", targets: ["CollectivesMPI"]),
        .library(name: "Kernels", targets: ["Kernels"]),
        .library(name: "Normalization", targets: ["Normalization"]),
        .library(name: "Training", targets: ["Training"]),
        .executable(name: "syncbn-train", targets: ["syncbn-train"]),
        .executable(name: "syncbn-bench", targets: ["syncbn-bench"]),
        .executable(name: "syncbn-study", targets: ["syncbn-study"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        // C shims: Open MPI's handles are macros, which do not import into Swift.
        .systemLibrary(name: "CMPI", pkgConfig: "ompi-c", providers: [.apt(["libopenmpi-dev"])]),
        .systemLibrary(name: "COpenBLAS", pkgConfig: "openblas", providers: [.apt(["libopenblas-dev"])]),

        // oneDNN's convolutions (Debian's libdnnl-dev, oneDNN 2.6, OpenMP runtime), behind a small C layer.
        .target(name: "CDNNL", linkerSettings: [.linkedLibrary("dnnl"), .linkedLibrary("gomp")]),
        .target(name: "CAllocator"),
        // zlib (Debian's zlib1g-dev) for gzipped IDX files; inflateInit2 is a macro, hence C.
        .target(name: "CGzip", linkerSettings: [.linkedLibrary("z")]),
        .target(name: "Collectives"),
        .target(name: "CollectivesMPI", dependencies: ["Collectives", "CMPI", "CAllocator", "Kernels"]),
        .target(name: "CollectiveChecks", dependencies: ["Collectives"]),
        .target(name: "Kernels", dependencies: ["COpenBLAS", "CDNNL"]),
        .target(name: "Normalization", dependencies: ["Kernels", "Collectives"]),
        .target(name: "Training", dependencies: ["Kernels", "Normalization", "Collectives", "CGzip"]),
        .target(name: "CommandSupport", dependencies: [
            "Collectives", "CollectivesMPI", "Kernels", "Training", "CAllocator",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .executableTarget(name: "syncbn-train", dependencies: [
            "Training", "Normalization", "CollectivesMPI", "CommandSupport",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        // The experiment runner: composes syncbn-train command lines, so it links no numerics
        // (the executable takes Kernels' writer lock on its --out).
        .target(name: "Study"),
        .executableTarget(name: "syncbn-study", dependencies: [
            "Study", "Kernels", .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .executableTarget(name: "syncbn-bench", dependencies: [
            "Training", "CollectivesMPI", "CollectiveChecks", "CommandSupport",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        // examples/: programs a user would write, built with the package and run by the tests.
        .executableTarget(name: "syncbn-example-custom-model", dependencies: ["Training", "Normalization", "Kernels", "Collectives", "CollectivesMPI"],
                          path: "examples/custom-model"),
        .executableTarget(name: "syncbn-example-training-loop", dependencies: ["Training", "Normalization", "Kernels", "Collectives", "CollectivesMPI"],
                          path: "examples/training-loop"),

        .testTarget(name: "CollectivesTests", dependencies: ["Collectives", "CollectiveChecks"]),
        .testTarget(name: "KernelsTests", dependencies: ["Kernels", "Collectives", "TestSupport"], exclude: ["Fixtures"]),
        .testTarget(name: "NormalizationTests", dependencies: ["Normalization", "Collectives", "TestSupport"], exclude: ["Fixtures"]),
        .testTarget(name: "TrainingTests", dependencies: ["Training", "Collectives", "TestSupport"], exclude: ["Fixtures"]),
        .testTarget(name: "IntegrationTests", dependencies: ["Kernels", "Training", "Study", "TestSupport"]),
        // A BN variant written outside the Normalization module, through its public API only.
        .testTarget(name: "ExtensionTests", dependencies: ["Normalization", "Training", "Collectives", "Kernels", "TestSupport"]),
        .target(name: "TestSupport", dependencies: ["Kernels"], path: "Tests/TestSupport"),
    ]
)
