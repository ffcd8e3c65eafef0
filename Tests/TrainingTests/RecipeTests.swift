import Collectives
import Foundation
import Kernels
import TestSupport
import Training
import XCTest

/// Learning-rate schedules, augmentation, gzipped IDX files and Fashion-MNIST.
final class RecipeTests: XCTestCase {
    var dir = ""
    override func setUp() { dir = temporaryDirectory() }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    // MARK: schedules

    func plan(_ schedule: LearningRateSchedule, warmupEpochs: Double? = nil, warmupSteps: Int? = nil, milestones: [Double] = [],
              reference: Int? = nil, ranks: Int = 1, batch: Int = 32) -> LearningRatePlan {
        var c = TrainingConfiguration()
        c.learningRate = 0.1
        c.batchSize = batch
        c.lrSchedule = schedule
        c.lrMilestones = milestones
        c.warmupEpochs = warmupEpochs
        c.warmupSteps = warmupSteps
        c.lrReferenceBatch = reference
        return c.learningRatePlan(ranks: ranks, stepsPerEpoch: 100, totalSteps: 1000)
    }

    func testWarmUpRisesLinearlyToThePeak() {
        let p = plan(.constant, warmupEpochs: 2)
        XCTAssertEqual(p.warmupSteps, 200)
        XCTAssertEqual(p.rate(at: 0), 0.1 / 200, accuracy: 1e-15)
        XCTAssertEqual(p.rate(at: 99), 0.1 * 100 / 200, accuracy: 1e-15)
        XCTAssertEqual(p.rate(at: 199), 0.1, accuracy: 1e-15)
        XCTAssertEqual(p.rate(at: 200), 0.1)
        XCTAssertEqual(plan(.constant, warmupSteps: 7).warmupSteps, 7)
        // Default: one epoch, at most a tenth of the run.
        XCTAssertEqual(plan(.constant).warmupSteps, 100)
        var c = TrainingConfiguration()
        XCTAssertEqual(c.learningRatePlan(ranks: 1, stepsPerEpoch: 100, totalSteps: 300).warmupSteps, 30)
        c.warmupSteps = 0
        XCTAssertEqual(c.learningRatePlan(ranks: 1, stepsPerEpoch: 100, totalSteps: 300).rate(at: 0), 0.1 * 32 / 128, accuracy: 1e-15)
    }

    func testCosineEndsNearZeroAndPassesHalfThepeakAtMidpoint() {
        let p = plan(.cosine, warmupSteps: 100)
        XCTAssertEqual(p.rate(at: 100), 0.1, accuracy: 1e-15)
        XCTAssertEqual(p.rate(at: 550), 0.05, accuracy: 1e-12)   // halfway through the 900 cosine steps
        XCTAssertEqual(p.rate(at: 999), 0.1 * 0.5 * (1 + cos(Double.pi * 899 / 900)), accuracy: 1e-15)
        XCTAssertLessThan(p.rate(at: 999), 1e-5)
        XCTAssertGreaterThan(p.rate(at: 999), 0)
        for step in 101..<1000 { XCTAssertLessThanOrEqual(p.rate(at: step), p.rate(at: step - 1)) }
    }

    func testStepScheduleDividesByTenAtEachMilestone() {
        let p = plan(.step, warmupSteps: 0, milestones: [5, 7.5])
        XCTAssertEqual(p.rate(at: 499), 0.1)
        XCTAssertEqual(p.rate(at: 500), 0.01, accuracy: 1e-15)
        XCTAssertEqual(p.rate(at: 749), 0.01, accuracy: 1e-15)
        XCTAssertEqual(p.rate(at: 750), 0.001, accuracy: 1e-15)
    }

    func testLinearScalingUsesTheTotalBatchOverAllRanks() {
        XCTAssertEqual(plan(.constant, warmupSteps: 0, reference: 256, ranks: 4, batch: 32).peak, 0.1 * 128 / 256, accuracy: 1e-15)
        XCTAssertEqual(plan(.constant, warmupSteps: 0, reference: 256, ranks: 1, batch: 128).peak, 0.05, accuracy: 1e-15)
        XCTAssertEqual(plan(.constant, warmupSteps: 0, reference: nil, ranks: 8, batch: 32).peak, 0.1)
    }

    // MARK: augmentation

    func images(count: Int, shape: [Int] = [2, 5, 6]) -> Dataset {
        let size = shape.reduce(1, *)
        return Dataset(sampleShape: shape, classes: 3, samples: (0..<(count * size)).map { Float($0 % 97) + 1 },
                       labels: (0..<count).map { Int32($0 % 3) })
    }

    func testCropAndFlipMoveTheImageAndPadWithTheStandardizedZero() {
        var data = images(count: 1, shape: [1, 3, 4])
        data.standardize(mean: [10], std: [2])   // a raw zero becomes −5
        XCTAssertEqual(data.paddingValues, [-5])
        let a = Augmentation(crop: true, flip: true, padding: 2)
        // Find draws for a shifted crop with and without a flip.
        var found: [Bool: (Int, (top: Int, left: Int, flip: Bool))] = [:]
        for index in 0..<200 {
            let d = a.draw(seed: 1, epoch: 0, index: index)
            if d.top == 3 && d.left == 1 && found[d.flip] == nil { found[d.flip] = (index, d) }
        }
        XCTAssertEqual(found.count, 2, "both flips occur")
        let source = data.samples   // 3×4, row-major
        for (flip, (_, draw)) in found {
            // top 3 → shifted up by 1; left 1 → shifted right by 1 (reading column w − 1).
            var expected = [Float](repeating: -5, count: 12)
            for h in 0..<3 {
                for w in 0..<4 {
                    let sh = h + 1, sw = (flip ? 3 - w : w) - 1
                    if sh < 3 && sw >= 0 && sw < 4 { expected[h * 4 + w] = source[sh * 4 + sw] }
                }
            }
            // Apply through a one-sample data set whose index 0 gets this draw: search a seed.
            var seed: UInt64 = 0
            while a.draw(seed: seed, epoch: 0, index: 0) != draw { seed += 1 }
            let (x, _) = data.batch([0], augmentation: a, seed: seed, epoch: 0)
            XCTAssertEqual(x.scalars, expected, "flip \(flip)")
        }
        // Identity: nothing drawn, nothing changed.
        XCTAssertEqual(data.batch([0], augmentation: Augmentation(), seed: 3, epoch: 0).0.scalars, source)
    }

    func testAugmentationDependsOnSeedEpochAndSampleOnly() {
        let data = images(count: 24)
        let a = Augmentation(crop: true, flip: true, padding: 4)
        let whole = data.batch(Array(0..<24), augmentation: a, seed: 9, epoch: 2).0
        // The same samples fetched in pieces (as ranks fetch their shards) and in another order.
        var pieces: [Float] = []
        for part in [0..<7, 7..<13, 13..<13, 13..<24] { pieces += data.batch(Array(part), augmentation: a, seed: 9, epoch: 2).0.scalars }
        XCTAssertEqual(pieces, whole.scalars)
        let reversed = data.batch(Array((0..<24).reversed()), augmentation: a, seed: 9, epoch: 2).0
        let size = data.sampleSize
        XCTAssertEqual(Array(reversed.scalars[(23 * size)..<(24 * size)]), Array(whole.scalars[0..<size]))
        XCTAssertNotEqual(data.batch(Array(0..<24), augmentation: a, seed: 9, epoch: 3).0.scalars, whole.scalars, "a new epoch draws anew")
        XCTAssertNotEqual(whole.scalars, data.batch(Array(0..<24)).0.scalars, "augmentation changes the batch")
    }

    func testAutomaticAugmentationFitsTheDataSet() {
        let fashion = Augmentation.automatic(for: .fashionMNIST(directory: "/x"), sampleShape: [1, 28, 28])
        XCTAssertEqual(fashion, Augmentation(crop: true, flip: true, padding: 2))
        XCTAssertEqual(Augmentation.automatic(for: .cifar10(directory: "/x"), sampleShape: [3, 32, 32]).padding, 4)
        XCTAssertTrue(Augmentation.automatic(for: .defaultSynthetic, sampleShape: [3, 16, 16]).isIdentity)
        XCTAssertEqual(try Augmentation(parsing: "crop,flip", padding: 4).description, "crop,flip")
        XCTAssertThrowsError(try Augmentation(parsing: "crop,rotate", padding: 4)) { XCTAssertTrue("\($0)".contains("rotate")) }
    }

    // MARK: gzipped IDX and Fashion-MNIST

    func write(_ name: String, _ bytes: [UInt8]) -> String { writeBytes(bytes, named: name, in: dir) }
    func idx(_ dims: [Int], _ values: [UInt8]) -> [UInt8] { idxBytes(dims, values) }

    /// gzip's own compressor (the system tool), so the reader is checked against an outside writer.
    func gzip(_ path: String) throws -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/gzip")
        process.arguments = ["-kf9", path]
        try process.run()
        process.waitUntilExit()
        XCTAssertEqual(process.terminationStatus, 0)
        return path + ".gz"
    }

    func testGzippedIDXFilesReadLikeTheUncompressedOnes() throws {
        let pixels = (0..<(50 * 6 * 5)).map { UInt8(($0 * 7) % 256) }
        let images = write("img", idx([50, 6, 5], pixels)), labels = write("lab", idx([50], (0..<50).map { UInt8($0 % 4) }))
        let plain = try DataSource.idx(images: images, labels: labels).load().train
        let packed = try DataSource.idx(images: try gzip(images), labels: try gzip(labels)).load().train
        XCTAssertEqual(packed.samples, plain.samples)
        XCTAssertEqual(packed.labels, plain.labels)
        // Two concatenated gzip members are one stream (as gzip itself reads them).
        let first = try Array(Data(contentsOf: URL(fileURLWithPath: try gzip(write("a", Array(idx([50, 6, 5], pixels).prefix(100)))))))
        let second = try Array(Data(contentsOf: URL(fileURLWithPath: try gzip(write("b", Array(idx([50, 6, 5], pixels).dropFirst(100)))))))
        let joined = write("joined.gz", first + second)
        XCTAssertEqual(try DataSource.idx(images: joined, labels: labels).load().train.samples, plain.samples)
    }

    func testCorruptAndTruncatedGzipFilesGiveOneLineErrors() throws {
        let labels = try gzip(write("lab", idx([50], (0..<50).map { UInt8($0 % 4) })))
        let compressed = try Array(Data(contentsOf: URL(fileURLWithPath: try gzip(write("img", idx([50, 6, 5], (0..<1500).map { UInt8($0 % 251) }))))))
        func assertFails(_ name: String, _ bytes: [UInt8], _ parts: [String], line: UInt = #line) {
            let path = write(name, bytes)
            XCTAssertThrowsError(try DataSource.idx(images: path, labels: labels).load(), line: line) { error in
                let message = "\(error)"
                for part in parts { XCTAssertTrue(message.contains(part), "'\(message)' lacks '\(part)'", line: line) }
                XCTAssertFalse(message.contains("\n"), line: line)
            }
        }
        assertFails("truncated.gz", Array(compressed.prefix(compressed.count / 2)), ["truncated.gz", "truncated"])
        var corrupt = compressed
        for i in 20..<40 { corrupt[i] ^= 0x5A }
        assertFails("corrupt.gz", corrupt, ["corrupt.gz", "cannot decompress"])
        var badCRC = compressed
        badCRC[badCRC.count - 6] ^= 0xFF   // inside the CRC-32 trailer
        assertFails("crc.gz", badCRC, ["crc.gz", "cannot decompress"])
        assertFails("fake.gz", [0, 0, 8, 1, 0, 0, 0, 0], ["fake.gz", "not gzip"])
        assertFails("garbage.gz", compressed + [1, 2, 3], ["garbage.gz", "trailing garbage"])
        // Crafted IDX dimensions whose product overflows or exceeds any real file.
        for (name, dims) in [("huge.idx", [0xFFFF_FFFF, 0xFFFF_FFFF, 0xFFFF_FFFF]), ("wide.idx", [0x7FFF_FFFF, 0x7FFF_FFFF])] {
            let path = write(name, idx(dims, [1, 2, 3, 4]))
            XCTAssertThrowsError(try DataSource.idx(images: path, labels: labels).load()) { error in
                XCTAssertTrue("\(error)".contains(name) && "\(error)".contains("too large"), "\(error)")
            }
        }
    }

    /// A gzip bomb: a small file whose IDX header declares millions of images is refused from the
    /// header, before anything is inflated; data inflating past what the header declares stops at
    /// the declared size.
    func testTheDataBudgetIsCheckedFromTheHeaderBeforeAnythingIsInflated() throws {
        let saved = DataMemory.budget
        defer { DataMemory.budget = saved }
        DataMemory.budget = 1 << 30
        let labels = try gzip(write("lab", idx([2], [0, 1])))
        let bomb = try gzip(write("bomb", idx([5_000_000, 28, 28], [UInt8](repeating: 0, count: 1 << 20))))
        let started = Date()
        XCTAssertThrowsError(try DataSource.idx(images: bomb, labels: labels).load()) { error in
            let message = "\(error)"
            for part in ["bomb.gz", "dimensions [5000000, 28, 28]", "14.60 GiB", "data budget of 1.00 GiB (maxDataBytes)"] {
                XCTAssertTrue(message.contains(part), "'\(message)' lacks '\(part)'")
            }
        }
        XCTAssertLessThan(Date().timeIntervalSince(started), 1, "refused from the header")
        let long = try gzip(write("long", idx([2, 2, 2], [UInt8](repeating: 7, count: 8 + (1 << 22)))))
        XCTAssertThrowsError(try DataSource.idx(images: long, labels: labels).load()) { error in
            XCTAssertTrue("\(error)".contains("long.gz") && "\(error)".contains("exceeds the size limit"), "\(error)")
        }
        XCTAssertEqual(try DataSource.idx(images: try gzip(write("ok", idx([2, 2, 2], [UInt8](repeating: 7, count: 8)))), labels: labels).load().train.count, 2)
        // Synthetic sources are checked from their counts, before anything is made.
        DataMemory.budget = 1 << 20
        XCTAssertThrowsError(try DataSource(parsing: "synthetic:train=1000,heldout=100")) { error in
            XCTAssertTrue("\(error)".contains("synthetic: 1000 + 100 samples need 3.2 MiB as Float, more than the data budget of 1.0 MiB"), "\(error)")
        }
        DataMemory.budget = nil
        XCTAssertNoThrow(try DataSource(parsing: "synthetic:train=1000,heldout=100"))
        XCTAssertThrowsError(try DataSource(parsing: "synthetic:train=1000000000"))
    }

    func testFashionMNISTReadsTheFourFilesWithTheTestSetHeldOut() throws {
        let images = idx([12, 28, 28], (0..<(12 * 784)).map { UInt8($0 % 256) }), labels = idx([12], (0..<12).map { UInt8($0 % 10) })
        for (name, bytes) in [("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels),
                              ("t10k-images-idx3-ubyte", Array(images.prefix(16)) + [UInt8](repeating: 3, count: 3 * 784)),
                              ("t10k-labels-idx1-ubyte", idx([3], [1, 2, 3]))] {
            _ = try gzip(write(name, bytes))
        }
        // The t10k image header above still says 12 images: fix it to 3.
        _ = try gzip(write("t10k-images-idx3-ubyte", idx([3, 28, 28], [UInt8](repeating: 3, count: 3 * 784))))
        let source = try DataSource(parsing: "fashion-mnist:\(dir)")
        XCTAssertEqual(source, .fashionMNIST(directory: dir))
        let split = try DataSource.split(source, evaluation: nil, heldOutFraction: 0.1)
        XCTAssertEqual(split.train.count, 12)
        XCTAssertEqual(split.heldOut.count, 3)
        XCTAssertEqual(split.train.sampleShape, [1, 28, 28])
        XCTAssertEqual(try DataSource(parsing: "fashion-mnist"), .fashionMNIST(directory: "/usr/share/datasets/fashion-mnist"))
        XCTAssertThrowsError(try DataSource.fashionMNIST(directory: DataSource.fashionMNISTDirectory + "-missing").load())
        if !FileManager.default.fileExists(atPath: DataSource.fashionMNISTDirectory) {
            XCTAssertThrowsError(try DataSource.fashionMNIST(directory: DataSource.fashionMNISTDirectory).load()) {
                XCTAssertTrue("\($0)".contains("apt-get install dataset-fashion-mnist"), "\($0)")
            }
        }
    }
}
