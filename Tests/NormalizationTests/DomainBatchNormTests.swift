import Collectives
import Kernels
import Normalization
import TestSupport
import XCTest

final class DomainBatchNormTests: XCTestCase {
    let x = randomTensor([6, 2, 3, 3], seed: 41, mean: 0.5)
    let domains: [Int32] = [0, 1, 1, 0, 1, 0]

    func makeLayer(group: (any Communicator)? = nil) -> DomainBatchNorm<Double> {
        let layer = DomainBatchNorm<Double>(featureCount: 2, domainCount: 2, group: group)
        layer.weight.value.scalars = [1.2, 0.7]
        layer.bias.value.scalars = [0.3, -0.2]
        return layer
    }

    /// Each domain's samples are BN of that domain's samples alone; each domain's running
    /// statistics follow its own batches; inference uses the sample's domain.
    func testEachDomainIsNormalizedWithItsOwnStatistics() throws {
        let layer = makeLayer()
        layer.domains = domains
        let y = try layer.forward(x, mode: .training)
        for d in 0..<2 {
            let rows = domains.indices.filter { domains[$0] == Int32(d) }
            let part = Tensor<Double>.concatenate(rows.map { x.slice(samples: $0..<($0 + 1)) }, sampleShape: [2, 3, 3])
            let bn = BatchNorm<Double>(featureCount: 2)
            bn.weight.value = layer.weight.value
            bn.bias.value = layer.bias.value
            let expected = try bn.forward(part, mode: .training)
            let actual = Tensor<Double>.concatenate(rows.map { y.slice(samples: $0..<($0 + 1)) }, sampleShape: [2, 3, 3])
            assertClose(actual.scalars, expected.scalars, relTol: 1e-13, absTol: 1e-14, "domain \(d) output")
            assertClose(layer.runningMeans[d].value.scalars, bn.runningMean.value.scalars, relTol: 1e-13, absTol: 1e-14, "domain \(d) running mean")
            assertClose(layer.runningVariances[d].value.scalars, bn.runningVariance.value.scalars, relTol: 1e-13, absTol: 1e-14, "domain \(d) running var")
            let inference = try bn.forward(part, mode: .inference)
            let layerInference = try layer.forward(x, mode: .inference)
            let picked = Tensor<Double>.concatenate(rows.map { layerInference.slice(samples: $0..<($0 + 1)) }, sampleShape: [2, 3, 3])
            assertClose(picked.scalars, inference.scalars, relTol: 1e-13, absTol: 1e-14, "domain \(d) inference")
        }
        XCTAssertEqual(layer.state.map(\.name), ["weight", "bias", "domains.0.running_mean", "domains.0.running_var", "domains.0.num_batches_tracked",
                                                 "domains.1.running_mean", "domains.1.running_var", "domains.1.num_batches_tracked"])
        layer.domains = [0, 1]
        XCTAssertThrowsError(try layer.forward(x, mode: .training), "one label per sample")
    }

    func testGradientsMatchFiniteDifferences() throws {
        let layer = makeLayer()
        layer.domains = domains
        try checkGradients(of: layer, input: x, tolerance: 1e-6)
    }

    /// Synced over three ranks with uneven shards (one empty): outputs, input gradients, summed
    /// γ/β gradients and per-domain running statistics equal one rank's on the whole batch; one
    /// collective per forward and per backward.
    func testSyncedOverRanksEqualsOneRank() throws {
        let sizes = [2, 0, 4], dy = randomTensor([6, 2, 3, 3], seed: 42)
        let single = makeLayer()
        single.domains = domains
        let y = try single.forward(x, mode: .training), dx = try single.backward(dy)
        let (x, domains) = (self.x, self.domains)
        let ranks = try InProcessGroup.run(size: 3) { base -> ([Double], [Double], [Double], [Double], Int) in
            let comm = InstrumentedCommunicator(base)
            let layer = self.makeLayer(group: comm)
            let start = sizes[..<comm.rank].reduce(0, +), range = start..<(start + sizes[comm.rank])
            layer.domains = Array(domains[range])
            let y = try layer.forward(x.slice(samples: range), mode: .training)
            let dx = try layer.backward(dy.slice(samples: range))
            return (y.scalars, dx.scalars, layer.weight.gradient.scalars, layer.runningMeans[1].value.scalars, comm.ledger.totalCollectives)
        }
        assertClose(ranks.flatMap(\.0), y.scalars, relTol: 1e-12, absTol: 1e-14, "outputs")
        assertClose(ranks.flatMap(\.1), dx.scalars, relTol: 1e-12, absTol: 1e-14, "input gradients")
        assertClose((0..<2).map { c in ranks.map { $0.2[c] }.reduce(0, +) }, single.weight.gradient.scalars, relTol: 1e-12, absTol: 1e-14, "γ gradients")
        for rank in ranks {
            assertClose(rank.3, single.runningMeans[1].value.scalars, relTol: 1e-12, absTol: 1e-14, "domain 1 running mean")
            XCTAssertEqual(rank.4, 2)
        }
    }
}
