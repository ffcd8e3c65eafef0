import Foundation
import Kernels
import XCTest

/// Fails unless every element of `actual` is within `absTol + relTol·|expected|` of `expected`.
/// Reports the worst element; NaN anywhere fails.
public func assertClose<A: BinaryFloatingPoint, B: BinaryFloatingPoint>(
    _ actual: [A], _ expected: [B], relTol: Double = 1e-6, absTol: Double = 0,
    _ message: @autoclosure () -> String = "", file: StaticString = #filePath, line: UInt = #line
) {
    guard actual.count == expected.count else {
        XCTFail("\(message()): \(actual.count) values, expected \(expected.count)", file: file, line: line)
        return
    }
    var worst = -1, worstExcess = 0.0
    for i in 0..<actual.count {
        let a = Double(actual[i]), e = Double(expected[i])
        guard a.isFinite == e.isFinite, !a.isNaN, !e.isNaN else {
            XCTFail("\(message()): element \(i) is \(a), expected \(e)", file: file, line: line)
            return
        }
        let excess = abs(a - e) - (absTol + relTol * abs(e))
        if excess > worstExcess || (worst < 0 && excess > 0) { worst = i; worstExcess = excess }
    }
    if worst >= 0 {
        XCTFail("\(message()): element \(worst) is \(Double(actual[worst])), expected \(Double(expected[worst])) (|diff| \(abs(Double(actual[worst]) - Double(expected[worst]))), relTol \(relTol), absTol \(absTol))", file: file, line: line)
    }
}

/// max|actual − expected| / max|expected|: the error measure used against reference values.
public func relativeError<A: BinaryFloatingPoint, B: BinaryFloatingPoint>(_ actual: [A], _ expected: [B]) -> Double {
    precondition(actual.count == expected.count, "relativeError: \(actual.count) vs \(expected.count) values")
    var diff = 0.0, scale = 0.0
    for i in 0..<actual.count {
        let d = abs(Double(actual[i]) - Double(expected[i]))
        diff = d.isNaN ? .infinity : max(diff, d)
        scale = max(scale, abs(Double(expected[i])))
    }
    return scale == 0 ? diff : diff / scale
}

/// Central finite differences of `loss` with respect to `count` values reached through `get` and
/// `set` (so that `loss` may read the same storage without overlapping access), in Double.
public func numericalGradient(count: Int, step: Double = 1e-5, get: (Int) -> Double, set: (Int, Double) -> Void,
                              _ loss: () throws -> Double) rethrows -> [Double] {
    var gradient = [Double](repeating: 0, count: count)
    for i in 0..<count {
        let saved = get(i)
        set(i, saved + step)
        let plus = try loss()
        set(i, saved - step)
        let minus = try loss()
        set(i, saved)
        gradient[i] = (plus - minus) / (2 * step)
    }
    return gradient
}

/// Σ a·b in Double.
public func dot<T: BinaryFloatingPoint>(_ a: [T], _ b: [T]) -> Double {
    zip(a, b).reduce(0) { $0 + Double($1.0) * Double($1.1) }
}

/// A Double tensor of N(0, 1) entries from a fixed seed.
public func randomTensor(_ shape: [Int], seed: UInt64, mean: Double = 0, std: Double = 1) -> Tensor<Double> {
    var random = DeterministicRandom(seed: seed, stream: [99])
    return .normal(shape: shape, mean: mean, std: std, using: &random)
}

/// The folder of this test target's fixtures (beside the test sources, so tests need nothing
/// outside the package).
public func fixturesDirectory(_ filePath: String = #filePath) -> String {
    URL(fileURLWithPath: filePath).deletingLastPathComponent().appendingPathComponent("Fixtures").path
}

/// A fresh temporary directory, removed by the caller's tearDown if it likes.
public func temporaryDirectory(_ label: String = "syncbn-test") -> String {
    let path = NSTemporaryDirectory() + "/\(label)-\(UUID().uuidString)"
    try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

/// An MNIST IDX file's bytes: unsigned-byte data of the given dimensions.
public func idxBytes(_ dims: [Int], _ values: [UInt8]) -> [UInt8] {
    [0, 0, 8, UInt8(dims.count)] + dims.flatMap { d in (0..<4).map { UInt8((d >> (8 * (3 - $0))) & 0xFF) } } + values
}

/// Writes `bytes` to `directory/name` and returns the path.
public func writeBytes(_ bytes: [UInt8], named name: String, in directory: String) -> String {
    let path = directory + "/" + name
    FileManager.default.createFile(atPath: path, contents: Data(bytes))
    return path
}
