import Kernels
import XCTest

/// Checks a layer's backward against central finite differences of L = Σ y·dy in Double: the
/// input gradient and every parameter's gradient, element by element.
///
/// `forward` defaults to the layer's own training-mode forward; multi-rank checks pass a closure
/// that runs every rank. Tolerance: |analytic − numeric| ≤ tol·(1 + |numeric|).
public func checkGradients<L: Layer>(
    of layer: L, input: Tensor<Double>, seed: UInt64 = 7, tolerance: Double = 1e-6,
    file: StaticString = #filePath, line: UInt = #line
) throws where L.Scalar == Double {
    var x = input
    let y = try layer.forward(x, mode: .training)
    let dy = randomTensor(y.shape, seed: seed)
    let dx = try layer.backward(dy)
    let analyticParameters = layer.parameters.map(\.gradient.scalars)

    func loss() throws -> Double { dot(try layer.forward(x, mode: .training).scalars, dy.scalars) }
    let numericInput = try numericalGradient(count: x.count, get: { x.scalars[$0] }, set: { x.scalars[$0] = $1 }, loss)
    assertGradient(dx.scalars, numericInput, tolerance, "input gradient", file: file, line: line)

    for (index, parameter) in layer.parameters.enumerated() {
        let numeric = try numericalGradient(count: parameter.value.count, get: { parameter.value.scalars[$0] },
                                            set: { parameter.value.scalars[$0] = $1 }, loss)
        assertGradient(analyticParameters[index], numeric, tolerance, "parameter \(index) gradient", file: file, line: line)
    }
}

public func assertGradient(_ analytic: [Double], _ numeric: [Double], _ tolerance: Double, _ what: String,
                           file: StaticString = #filePath, line: UInt = #line) {
    XCTAssertEqual(analytic.count, numeric.count, what, file: file, line: line)
    XCTAssertFalse(numeric.allSatisfy { $0 == 0 } && analytic.allSatisfy { $0 == 0 } && !numeric.isEmpty,
                   "\(what): all-zero gradients prove nothing", file: file, line: line)
    for i in 0..<min(analytic.count, numeric.count) {
        let error = abs(analytic[i] - numeric[i])
        if !(error <= tolerance * (1 + abs(numeric[i]))) {
            XCTFail("\(what)[\(i)]: analytic \(analytic[i]), numeric \(numeric[i])", file: file, line: line)
            return
        }
    }
}
