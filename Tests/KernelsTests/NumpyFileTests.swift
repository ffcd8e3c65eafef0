import Foundation
import Kernels
import TestSupport
import XCTest

final class NumpyFileTests: XCTestCase {
    func testRoundTripsFloatAndDoubleTensors() throws {
        let dir = temporaryDirectory()
        let f = Tensor<Float>(shape: [2, 3], scalars: [1, -2, 3.5, 0, 1e-7, -1e30])
        try writeNumpy(f, to: dir + "/f.npy")
        let read = try NumpyArray(contentsOf: dir + "/f.npy")
        XCTAssertEqual(read.shape, [2, 3])
        XCTAssertEqual(read.descriptor, "<f4")
        XCTAssertEqual(read.tensor(as: Float.self), f)
        let d = Tensor<Double>(shape: [4], scalars: [1, 2, 3, .pi])
        try writeNumpy(d, to: dir + "/d.npy")
        XCTAssertEqual(try NumpyArray(contentsOf: dir + "/d.npy").tensor(as: Double.self), d)
    }

    func testMalformedFilesNameTheFileAndTheProblem() throws {
        let dir = temporaryDirectory()
        try writeNumpy(Tensor<Float>(shape: [10], repeating: 1), to: dir + "/ok.npy")
        let good = try Data(contentsOf: URL(fileURLWithPath: dir + "/ok.npy"))
        let cases: [(String, Data, String)] = [
            ("magic.npy", Data("hello world".utf8), "not a .npy file"),
            ("short.npy", good.prefix(good.count - 8), "truncated"),
            ("long.npy", good + Data([1, 2, 3, 4]), "trailing"),
            ("dtype.npy", replacing(Data("<f4".utf8), with: Data("<c8".utf8), in: good), "unsupported dtype"),
            // Crafted shapes whose element count overflows or dwarfs the file.
            ("huge.npy", npy(shape: "(4611686018427387904, 4)"), "truncated"),
            ("overflow.npy", npy(shape: "(9223372036854775807, 9223372036854775807)"), "truncated"),
            ("big.npy", npy(shape: "(1000000000, 1000000000)"), "truncated"),
        ]
        for (name, data, problem) in cases {
            try data.write(to: URL(fileURLWithPath: dir + "/" + name))
            XCTAssertThrowsError(try NumpyArray(contentsOf: dir + "/" + name)) { error in
                let text = "\(error)"
                XCTAssertTrue(text.contains(name) && text.contains(problem), "\(name): \(text)")
            }
        }
        XCTAssertThrowsError(try NumpyArray(contentsOf: dir + "/missing.npy")) { error in
            XCTAssertTrue("\(error)".contains("no such file"))
        }
    }

    /// A version-1 .npy file with the given shape text and 16 data bytes.
    func npy(shape: String) -> Data {
        var header = "{'descr': '<f4', 'fortran_order': False, 'shape': \(shape), }"
        while (10 + header.utf8.count + 1) % 64 != 0 { header += " " }
        header += "\n"
        var data = Data([0x93] + Array("NUMPY".utf8) + [1, 0, UInt8(header.utf8.count & 0xFF), UInt8(header.utf8.count >> 8)])
        data.append(contentsOf: Array(header.utf8))
        data.append(contentsOf: [UInt8](repeating: 0, count: 16))
        return data
    }

    func replacing(_ old: Data, with new: Data, in data: Data) -> Data {
        var copy = data
        copy.replaceSubrange(data.range(of: old)!, with: new)
        return copy
    }

    func testAtomicWriteLeavesNoTemporaryFiles() throws {
        let dir = temporaryDirectory()
        try writeNumpy(Tensor<Float>(shape: [3], repeating: 2), to: dir + "/a.npy")
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), ["a.npy"])
        XCTAssertThrowsError(try writeNumpy(Tensor<Float>(shape: [3]), to: dir + "/no/such/dir/a.npy"))
    }
}
