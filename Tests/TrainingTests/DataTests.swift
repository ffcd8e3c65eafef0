import Collectives
import Foundation
import Kernels
import TestSupport
import Training
import XCTest

final class DataTests: XCTestCase {
    var dir = ""
    override func setUp() { dir = temporaryDirectory() }

    func write(_ name: String, _ bytes: [UInt8]) -> String { writeBytes(bytes, named: name, in: dir) }
    func idx(_ dims: [Int], _ values: [UInt8]) -> [UInt8] { idxBytes(dims, values) }

    func assertDataError(_ text: String, _ parts: [String], file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try DataSource.split(try DataSource(parsing: text), evaluation: nil, heldOutFraction: 0.25), file: file, line: line) { error in
            let message = "\(error)"
            for part in parts { XCTAssertTrue(message.contains(part), "'\(message)' lacks '\(part)'", file: file, line: line) }
            XCTAssertFalse(message.contains("\n"), "one line: \(message)", file: file, line: line)
        }
    }

    func testIDXFilesLoadAsSingleChannelImagesScaledAndStandardized() throws {
        let images = write("img", idx([4, 2, 3], (0..<24).map { UInt8($0 * 10) }))
        let labels = write("lab", idx([4], [0, 1, 2, 1]))
        let (train, heldOut) = try DataSource.idx(images: images, labels: labels).load()
        XCTAssertNil(heldOut)
        XCTAssertEqual(train.sampleShape, [1, 2, 3])
        XCTAssertEqual(train.classes, 3)
        XCTAssertEqual(train.samples[5], 50 / 255)
        let split = try DataSource.split(.idx(images: images, labels: labels), evaluation: nil, heldOutFraction: 0.25)
        XCTAssertEqual(split.train.count, 3)
        XCTAssertEqual(split.heldOut.count, 1)
        let (mean, std) = split.train.channelMoments()
        XCTAssertEqual(mean[0], 0, accuracy: 1e-6)
        XCTAssertEqual(std[0], 1, accuracy: 1e-6)
    }

    func testBrokenIDXFilesNameTheFileAndTheProblem() {
        let labels = write("lab", idx([4], [0, 1, 2, 1]))
        let truncated = write("short", Array(idx([4, 2, 3], [UInt8](repeating: 1, count: 24)).dropLast(5)))
        assertDataError("idx:\(truncated),\(labels)", ["short", "truncated"])
        let fewer = write("three", idx([3, 2, 3], [UInt8](repeating: 1, count: 18)))
        assertDataError("idx:\(fewer),\(labels)", ["lab", "4 labels", "3 images"])
        let magic = write("magic", [1, 2, 3, 4, 5])
        assertDataError("idx:\(magic),\(labels)", ["magic", "not an IDX file"])
        assertDataError("idx:\(dir)/nope,\(labels)", ["nope", "no such file"])
        assertDataError("idx:only-one", ["expected idx:FILE1,FILE2"])
    }

    func testCIFAR10BinaryBatchesLoadWithTheTestBatchHeldOut() throws {
        let cifar = dir + "/cifar"
        try FileManager.default.createDirectory(atPath: cifar, withIntermediateDirectories: true)
        let record: (UInt8) -> [UInt8] = { [$0] + [UInt8](repeating: $0 * 20, count: 3072) }
        FileManager.default.createFile(atPath: cifar + "/data_batch_1.bin", contents: Data(record(1) + record(7) + record(3)))
        FileManager.default.createFile(atPath: cifar + "/test_batch.bin", contents: Data(record(9) + record(0)))
        let split = try DataSource.split(try DataSource(parsing: "cifar10:\(cifar)"), evaluation: nil, heldOutFraction: 0.1)
        XCTAssertEqual(split.train.count, 3)
        XCTAssertEqual(split.heldOut.count, 2)
        XCTAssertEqual(split.train.sampleShape, [3, 32, 32])
        XCTAssertEqual(split.heldOut.labels, [9, 0])
        FileManager.default.createFile(atPath: cifar + "/data_batch_2.bin", contents: Data(Array(record(2).dropLast())))
        assertDataError("cifar10:\(cifar)", ["data_batch_2.bin", "not a multiple"])
        assertDataError("cifar10:\(dir)/none", ["none", "no such directory"])
    }

    func testNumpyPairsLoadAndRejectMismatchesNaNAndFractionalLabels() throws {
        try writeNumpy(Tensor<Float>(shape: [6, 4], scalars: (0..<24).map(Float.init)), to: dir + "/x.npy")
        try writeNumpy(Tensor<Double>(shape: [6], scalars: [0, 1, 0, 1, 2, 2]), to: dir + "/y.npy")
        let split = try DataSource.split(try DataSource(parsing: "npy:\(dir)/x.npy,\(dir)/y.npy"), evaluation: nil, heldOutFraction: 0.34)
        XCTAssertEqual(split.train.sampleShape, [4])
        XCTAssertEqual(split.train.classes, 3)
        XCTAssertEqual(split.train.count + split.heldOut.count, 6)

        try writeNumpy(Tensor<Double>(shape: [5], scalars: [0, 1, 0, 1, 2]), to: dir + "/y5.npy")
        assertDataError("npy:\(dir)/x.npy,\(dir)/y5.npy", ["y5.npy", "5 labels", "6 samples"])
        try writeNumpy(Tensor<Double>(shape: [6], scalars: [0, 1, 0.5, 1, 2, 2]), to: dir + "/yf.npy")
        assertDataError("npy:\(dir)/x.npy,\(dir)/yf.npy", ["yf.npy", "integers"])
        try writeNumpy(Tensor<Float>(shape: [6, 4], scalars: [.nan] + (1..<24).map(Float.init)), to: dir + "/xn.npy")
        assertDataError("npy:\(dir)/xn.npy,\(dir)/y.npy", ["xn.npy", "not finite"])
    }

    func testDataSourceParsingRejectsUnknownFormsInOneLine() {
        for (text, part) in [("imagenet:/x", "unknown source"), ("synthetic:train=abc", "train=N"),
                             ("synthetic:colour=3", "unknown option"), ("cifar10:", "cifar10:DIRECTORY"), ("synthetic:train=1", "train ≥ 2")] {
            XCTAssertThrowsError(try DataSource(parsing: text), text) { XCTAssertTrue("\($0)".contains(part), "\(text): \($0)") }
        }
        XCTAssertEqual(try DataSource(parsing: "synthetic"), .defaultSynthetic)
        XCTAssertEqual(try DataSource(parsing: "synthetic:train=100,seed=4"), .synthetic(train: 100, heldOut: 2048, seed: 4))
    }

    func testSyntheticDataDependsOnlyOnTheSeedAndIsBalancedEnough() {
        let a = SyntheticImages.make(trainCount: 500, heldOutCount: 10, seed: 1)
        let b = SyntheticImages.make(trainCount: 500, heldOutCount: 10, seed: 1)
        let c = SyntheticImages.make(trainCount: 500, heldOutCount: 10, seed: 2)
        XCTAssertEqual(a.train.samples, b.train.samples)
        XCTAssertEqual(a.train.labels, b.train.labels)
        XCTAssertNotEqual(a.train.samples, c.train.samples)
        for k in 0..<10 { XCTAssertGreaterThan(a.train.labels.filter { $0 == k }.count, 25, "class \(k)") }
        // A shorter set is a prefix of a longer one: sample i depends on (seed, i) only.
        let prefix = SyntheticImages.make(trainCount: 100, heldOutCount: 10, seed: 1)
        XCTAssertEqual(Array(a.train.samples.prefix(100 * 768)), prefix.train.samples)
    }

    func testSamplerCoversEachEpochOnceAndShardsTheGlobalBatch() {
        let count = 23, ranks = 3, batch = 2
        var samplers = (0..<ranks).map { ShardedSampler(sampleCount: count, globalBatchSize: ranks * batch, seed: 9, ranks: ranks, rank: $0) }
        var single = ShardedSampler(sampleCount: count, globalBatchSize: ranks * batch, seed: 9, ranks: 1, rank: 0)
        XCTAssertEqual(single.stepsPerEpoch, 4)   // 23 = 3·6 + 5
        for epoch in 0..<2 {
            var seen: [Int] = []
            for step in (epoch * 4)..<(epoch * 4 + 4) {
                let pieces = (0..<ranks).map { samplers[$0].batch(step: step) }
                let whole = single.batch(step: step)
                XCTAssertEqual(pieces.flatMap { Array($0.indices) }, Array(whole.indices))
                XCTAssertTrue(pieces.allSatisfy { $0.globalCount == whole.indices.count && $0.epoch == epoch })
                seen += whole.indices
            }
            XCTAssertEqual(seen.sorted(), Array(0..<count), "epoch \(epoch) visits every sample once")
        }
        XCTAssertNotEqual(ShardedSampler.permutation(count: 50, seed: 9, epoch: 0), ShardedSampler.permutation(count: 50, seed: 9, epoch: 1))
        // A trailing batch of one sample is dropped: 25 = 4·6 + 1.
        XCTAssertEqual(ShardedSampler(sampleCount: 25, globalBatchSize: 6, seed: 0, ranks: 1, rank: 0).stepsPerEpoch, 4)
    }

    /// class-sorted: the same global batches, cut after ordering them by label, so each rank's
    /// batch holds as few classes as possible.
    func testClassSortedSamplerKeepsTheGlobalBatchAndGroupsLabels() {
        let count = 40, ranks = 4, batch = 5
        let labels = (0..<count).map { Int32(($0 * 7) % 10) }
        var random = ShardedSampler(sampleCount: count, globalBatchSize: ranks * batch, seed: 3, ranks: 1, rank: 0)
        var sorted = (0..<ranks).map { ShardedSampler(sampleCount: count, globalBatchSize: ranks * batch, seed: 3, ranks: ranks, rank: $0,
                                                      classSortedLabels: labels) }
        var unsorted = (0..<ranks).map { ShardedSampler(sampleCount: count, globalBatchSize: ranks * batch, seed: 3, ranks: ranks, rank: $0) }
        var classesPerRank: [Int] = [], classesPerRankRandom: [Int] = []
        for step in 0..<4 {
            let pieces = (0..<ranks).map { Array(sorted[$0].batch(step: step).indices) }
            XCTAssertEqual(pieces.flatMap { $0 }.sorted(), Array(random.batch(step: step).indices).sorted(), "step \(step): the same global batch")
            let flat = pieces.flatMap { $0 }.map { labels[$0] }
            XCTAssertEqual(flat, flat.sorted(), "ranks take consecutive label ranges")
            classesPerRank += pieces.map { Set($0.map { labels[$0] }).count }
            classesPerRankRandom += (0..<ranks).map { Set(unsorted[$0].batch(step: step).indices.map { labels[$0] }).count }
        }
        XCTAssertLessThan(classesPerRank.reduce(0, +), classesPerRankRandom.reduce(0, +), "fewer classes per rank than a random cut")
    }

    /// two-domain-shrunk and two-domain-contrast: domain 1 is each image at half size (2×2 means,
    /// centred on the background) or at a third of its contrast around its mean, checked on a
    /// hand-made 1×4×4 image.
    func testShrunkAndContrastDomainsAreTheImagesChanged() throws {
        let pixels: [Float] = (0..<16).map { Float($0) }
        let image = Dataset(sampleShape: [1, 4, 4], classes: 2, samples: pixels + pixels.map { 15 - $0 }, labels: [0, 1])
        let shrunk = try image.withSecondDomain(.shrunk)
        XCTAssertEqual(shrunk.count, 4)
        XCTAssertEqual(shrunk.labels, [0, 0, 1, 1])
        XCTAssertEqual(shrunk.domains, [0, 1, 0, 1])
        XCTAssertEqual(Array(shrunk.samples[0..<16]), pixels)
        // 2×2 means of rows 0–1 and 2–3: (0+1+4+5)/4 = 2.5, 4.5, 10.5, 12.5, at rows and columns 1–2; 0 elsewhere.
        XCTAssertEqual(Array(shrunk.samples[16..<32]), [0, 0, 0, 0, 0, 2.5, 4.5, 0, 0, 10.5, 12.5, 0, 0, 0, 0, 0])
        let contrast = try image.withSecondDomain(.contrast)
        XCTAssertEqual(Array(contrast.samples[16..<32]), pixels.map { 7.5 + ($0 - 7.5) / 3 })
        XCTAssertEqual(Array(contrast.samples[48..<64]), pixels.map { 7.5 + (15 - $0 - 7.5) / 3 })
        XCTAssertEqual(try DataSource(parsing: "two-domain-contrast:synthetic:train=20,heldout=6,seed=2"),
                       .shiftedDomain(.synthetic(train: 20, heldOut: 6, seed: 2), .contrast))
        XCTAssertEqual(DataSource.shiftedDomain(.synthetic(train: 20, heldOut: 6, seed: 2), .shrunk).description,
                       "two-domain-shrunk:synthetic:train=20,heldout=6,seed=2")
        XCTAssertThrowsError(try DataSource(parsing: "two-domain-shrunk:two-domain:synthetic")) { XCTAssertTrue("\($0)".contains("already has domains")) }
        XCTAssertThrowsError(try Dataset(sampleShape: [16], classes: 2, samples: pixels, labels: [0]).withSecondDomain(.shrunk))
    }

    /// With domain labels, an evaluation reports each domain's accuracy; with equal counts their
    /// mean is the overall accuracy, and the counts add up on any number of ranks.
    func testEvaluationsReportEachDomainsAccuracy() throws {
        let data = try DataSource.split(.shiftedDomain(.synthetic(train: 256, heldOut: 50, seed: 4), .contrast), evaluation: nil, heldOutFraction: 0.1)
        var c = TrainingConfiguration()
        c.steps = 8
        c.domainBN = true
        let evaluations = try [1, 3].map { ranks in
            try InProcessGroup.run(size: ranks) { comm -> Evaluation in
                var c = c
                c.batchSize = 48 / ranks   // one global batch: the same run
                let trainer = try Trainer(configuration: c, data: data, world: comm)
                _ = try trainer.run()
                return try trainer.evaluate()
            }[0]
        }
        XCTAssertEqual(evaluations[0], evaluations[1], "the same on 1 and 3 ranks")
        for evaluation in evaluations {
            let domains = try XCTUnwrap(evaluation.domainAccuracies)
            XCTAssertEqual(domains.count, 2)
            XCTAssertEqual((domains[0] + domains[1]) / 2, evaluation.accuracy, accuracy: 1e-12)
            for accuracy in domains { XCTAssertEqual((accuracy * 50).rounded(), accuracy * 50, accuracy: 1e-9, "a count of the 50 held-out images of a domain") }
        }
        XCTAssertNil(try Trainer(configuration: TrainingConfiguration(), data: try DataSource.split(.synthetic(train: 64, heldOut: 8, seed: 0), evaluation: nil, heldOutFraction: 0.1),
                                 world: SingleProcessCommunicator()).evaluate().domainAccuracies)
    }

    /// two-domain:SRC interleaves every sample with its intensity-inverted copy (domain 1), in the
    /// training and the held-out set; npy:X,Y,D reads domain labels.
    func testTwoDomainDataAndDomainLabelFiles() throws {
        let source = DataSource.synthetic(train: 20, heldOut: 6, seed: 2)
        let (plain, plainHeldOut) = try source.load()
        let parsed = try DataSource(parsing: "two-domain:synthetic:train=20,heldout=6,seed=2")
        XCTAssertEqual(parsed, .twoDomain(source))
        let (train, heldOut) = try parsed.load()
        XCTAssertEqual(train.count, 40)
        XCTAssertEqual(heldOut?.count, 12)
        XCTAssertEqual(train.domains, (0..<40).map { Int32($0 % 2) })
        let lo = plain.samples.min()!, hi = plain.samples.max()!
        let size = plain.sampleSize
        for i in [0, 7, 19] {
            XCTAssertEqual(Array(train.samples[(2 * i * size)..<((2 * i + 1) * size)]), Array(plain.samples[(i * size)..<((i + 1) * size)]))
            XCTAssertEqual(Array(train.samples[((2 * i + 1) * size)..<((2 * i + 2) * size)]),
                           plain.samples[(i * size)..<((i + 1) * size)].map { lo + hi - $0 })
            XCTAssertEqual(train.labels[2 * i + 1], plain.labels[i])
        }
        XCTAssertEqual(plainHeldOut?.count, 6)
        // Domains survive the split and standardization.
        let split = try DataSource.split(parsed, evaluation: nil, heldOutFraction: 0.1)
        XCTAssertEqual(split.train.domains?.count, 40)
        XCTAssertEqual(split.heldOut.domains, (0..<12).map { Int32($0 % 2) })

        let dir = temporaryDirectory("syncbn-domains")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try writeNumpy(Tensor<Float>(shape: [4, 3], scalars: (0..<12).map { Float($0) }), to: dir + "/x.npy")
        try writeNumpy(Tensor<Float>(shape: [4], scalars: [0, 1, 0, 1]), to: dir + "/y.npy")
        try writeNumpy(Tensor<Float>(shape: [4], scalars: [1, 0, 1, 1]), to: dir + "/d.npy")
        try writeNumpy(Tensor<Float>(shape: [3], scalars: [1, 0, 1]), to: dir + "/short.npy")
        let (withDomains, _) = try DataSource(parsing: "npy:\(dir)/x.npy,\(dir)/y.npy,\(dir)/d.npy").load()
        XCTAssertEqual(withDomains.domains, [1, 0, 1, 1])
        XCTAssertThrowsError(try DataSource(parsing: "npy:\(dir)/x.npy,\(dir)/y.npy,\(dir)/short.npy").load()) { error in
            XCTAssertTrue("\(error)".contains("one per sample"), "\(error)")
        }
    }
}
