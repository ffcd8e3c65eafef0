import Collectives
import Foundation
import TestSupport
import Training
import XCTest

/// The start-up agreement compares whole contents: a data copy or a checkpoint that differs
/// anywhere, in one value or in the order of two samples, is a difference named before training.
final class AgreementTests: XCTestCase {
    /// Every rank checks its own agreement; the error each rank throws (nil when they agree).
    func check(_ agreements: [RunAgreement]) throws -> [String?] {
        try InProcessGroup.run(size: agreements.count) { comm -> String? in
            do { try agreements[comm.rank].check(comm); return nil } catch { return "\(error)" }
        }
    }

    func dataset(_ count: Int, swapping pair: (Int, Int)? = nil, changing value: Int? = nil) -> Dataset {
        var samples = (0..<(count * 12)).map { Float($0 % 97) * 0.25 }
        var labels = (0..<count).map { Int32($0 % 10) }
        if let (a, b) = pair {
            for i in 0..<12 { samples.swapAt(a * 12 + i, b * 12 + i) }
            labels.swapAt(a, b)
        }
        if let value { samples[value] = samples[value].nextUp }
        return Dataset(sampleShape: [3, 2, 2], classes: 10, samples: samples, labels: labels)
    }

    func testDataCopiesThatDifferAnywhereAreNamed() throws {
        let count = 10_000
        // Samples 1 and 2 lie between the evenly spread records a sampled fingerprint would read.
        let variants = [dataset(count, swapping: (1, 2)), dataset(count, changing: count * 12 - 3), dataset(count, swapping: (5_001, 5_003))]
        for (index, variant) in variants.enumerated() {
            var a = RunAgreement(), b = RunAgreement()
            a.add(data: dataset(count), as: "--data (the training set)")
            b.add(data: variant, as: "--data (the training set)")
            let errors = try check([a, b, a])
            XCTAssertEqual(errors.compactMap { $0 }.count, 3, "variant \(index): every rank stops")
            XCTAssertTrue(errors[0]?.contains("--data (the training set) is 10000 samples") ?? false, "\(errors[0] ?? "nil")")
            XCTAssertTrue(errors[0]?.contains("on ranks 0,2 but") ?? false, "\(errors[0] ?? "nil")")
            XCTAssertEqual(Set(errors), [errors[0]], "the same message on every rank")
        }
        var a = RunAgreement(), b = RunAgreement()
        a.add(data: dataset(count), as: "--data")
        b.add(data: dataset(count), as: "--data")
        XCTAssertEqual(try check([a, b]), [nil, nil], "equal copies agree")
    }

    func testResumeFilesThatDifferAfterTheirFirstMebibyteAreNamed() throws {
        let dir = temporaryDirectory("syncbn-agreement")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var bytes = [UInt8]((0..<(3 << 20) + 5).map { UInt8(truncatingIfNeeded: $0 &* 31) })
        let first = writeBytes(bytes, named: "a.safetensors", in: dir)
        let same = writeBytes(bytes, named: "same.safetensors", in: dir)
        bytes[(2 << 20) + 17] ^= 1
        let second = writeBytes(bytes, named: "b.safetensors", in: dir)
        bytes[(2 << 20) + 17] ^= 1
        bytes[bytes.count - 1] ^= 0x80   // in the last, partial word
        let third = writeBytes(bytes, named: "c.safetensors", in: dir)
        for other in [second, third] {
            var a = RunAgreement(), b = RunAgreement()
            a.add(file: first, as: "--resume")
            b.add(file: other, as: "--resume")
            let errors = try check([a, b])
            XCTAssertTrue(errors[0]?.contains("--resume is \(bytes.count) bytes, content") ?? false, "\(errors[0] ?? "nil")")
        }
        var a = RunAgreement(), b = RunAgreement()
        a.add(file: first, as: "--resume")
        b.add(file: same, as: "--resume")
        XCTAssertEqual(try check([a, b]), [nil, nil], "equal files agree")
    }
}
