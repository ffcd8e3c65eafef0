import Foundation
import Kernels

/// A tensor as stored in a safetensors file: dtype, shape and little-endian bytes.
public struct StoredTensor: Equatable {
    public enum DType: String { case f32 = "F32", f64 = "F64", i64 = "I64" }
    public let dtype: DType
    public let shape: [Int]
    public let bytes: [UInt8]

    public init(floats: [Float], shape: [Int]) {
        dtype = .f32
        self.shape = shape
        bytes = floats.withUnsafeBytes { Array($0) }
    }

    public init(doubles: [Double], shape: [Int]) {
        dtype = .f64
        self.shape = shape
        bytes = doubles.withUnsafeBytes { Array($0) }
    }

    /// F64 values exactly (nil for other dtypes).
    public var doubles: [Double]? {
        guard dtype == .f64 else { return nil }
        return bytes.withUnsafeBytes { raw in (0..<(bytes.count / 8)).map { Double(bitPattern: UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 8 * $0, as: UInt64.self))) } }
    }

    public init(int64: Int64) {
        dtype = .i64
        shape = []
        bytes = withUnsafeBytes(of: int64.littleEndian) { Array($0) }
    }

    init(dtype: DType, shape: [Int], bytes: [UInt8]) {
        self.dtype = dtype
        self.shape = shape
        self.bytes = bytes
    }

    public var floats: [Float]? {
        switch dtype {
        case .f32: return bytes.withUnsafeBytes { raw in (0..<(bytes.count / 4)).map { Float(bitPattern: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 4 * $0, as: UInt32.self))) } }
        case .f64: return bytes.withUnsafeBytes { raw in (0..<(bytes.count / 8)).map { Float(Double(bitPattern: UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 8 * $0, as: UInt64.self)))) } }
        case .i64: return nil
        }
    }

    public var int64: Int64? {
        guard dtype == .i64, bytes.count == 8 else { return nil }
        return bytes.withUnsafeBytes { Int64(littleEndian: $0.loadUnaligned(as: Int64.self)) }
    }
}

/// The safetensors format (github.com/huggingface/safetensors): an 8-byte little-endian header
/// length, a JSON header mapping names to {dtype, shape, data_offsets} plus `__metadata__`
/// (string → string), then the tensor bytes. Readable by numpy/PyTorch users with the
/// `safetensors` package.
public enum Safetensors {
    /// Writes tensors in the given order, atomically (temp file + rename).
    public static func write(_ tensors: [(name: String, tensor: StoredTensor)], metadata: [String: String], to path: String) throws {
        var entries: [String] = []
        if !metadata.isEmpty {
            let fields = metadata.keys.sorted().map { "\(jsonString($0)):\(jsonString(metadata[$0]!))" }
            entries.append("\"__metadata__\":{\(fields.joined(separator: ","))}")
        }
        var offset = 0
        for (name, tensor) in tensors {
            let end = offset + tensor.bytes.count
            entries.append("\(jsonString(name)):{\"dtype\":\"\(tensor.dtype.rawValue)\",\"shape\":[\(tensor.shape.map(String.init).joined(separator: ","))],\"data_offsets\":[\(offset),\(end)]}")
            offset = end
        }
        var header = Array(("{" + entries.joined(separator: ",") + "}").utf8)
        while header.count % 8 != 0 { header.append(0x20) }
        var data = Data()
        data.reserveCapacity(8 + header.count + offset)
        withUnsafeBytes(of: UInt64(header.count).littleEndian) { data.append(contentsOf: $0) }
        data.append(contentsOf: header)
        for (_, tensor) in tensors { data.append(contentsOf: tensor.bytes) }
        try writeAtomically(data, to: path)
    }

    /// Reads every tensor and the metadata; a malformed file throws a ``FileFormatError``.
    /// The header length stored in a file's first 8 bytes, checked against the file's size.
    private static func headerLength(_ prefix: some Collection<UInt8>, fileSize: Int, path: String) throws -> Int {
        guard prefix.count >= 8, fileSize >= 8 else { throw FileFormatError(path, "too short to be a safetensors file") }
        let length = prefix.prefix(8).enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        guard length <= UInt64(fileSize - 8) else {
            throw FileFormatError(path, "truncated: header length \(length) exceeds the file (\(fileSize) bytes)")
        }
        return Int(length)
    }

    /// The header's JSON object and its `__metadata__`.
    private static func header(_ bytes: Data, path: String) throws -> (header: [String: Any], metadata: [String: String]) {
        guard let json = try? JSONSerialization.jsonObject(with: bytes), let header = json as? [String: Any] else {
            throw FileFormatError(path, "header is not a JSON object (not a safetensors file?)")
        }
        guard let meta = header["__metadata__"] else { return (header, [:]) }
        guard let metadata = meta as? [String: String] else { throw FileFormatError(path, "__metadata__ must map strings to strings") }
        return (header, metadata)
    }

    /// A file's `__metadata__` alone: reads the header, not the tensors (a checkpoint's
    /// configuration without loading its weights).
    public static func metadata(_ path: String) throws -> [String: String] {
        try requireReadableFile(path)
        guard let handle = FileHandle(forReadingAtPath: path) else { throw FileFormatError(path, "cannot be read") }
        defer { try? handle.close() }
        let size = Int(try handle.seekToEnd())
        try handle.seek(toOffset: 0)
        let length = try headerLength(try handle.read(upToCount: 8) ?? Data(), fileSize: size, path: path)
        return try header(try handle.read(upToCount: length) ?? Data(), path: path).metadata
    }

    public static func read(_ path: String) throws -> (tensors: [String: StoredTensor], metadata: [String: String]) {
        let bytes = try readFile(path)
        let dataStart = 8 + (try headerLength(bytes, fileSize: bytes.count, path: path))
        let (header, metadata) = try header(Data(bytes[8..<dataStart]), path: path)
        let dataLength = bytes.count - dataStart
        var tensors: [String: StoredTensor] = [:]
        var ranges: [(start: Int, end: Int, name: String)] = []
        for (name, value) in header where name != "__metadata__" {
            guard let info = value as? [String: Any], let dtypeName = info["dtype"] as? String,
                  let shape = info["shape"] as? [Int], let offsets = info["data_offsets"] as? [Int], offsets.count == 2
            else { throw FileFormatError(path, "entry '\(name)' lacks dtype, shape or data_offsets") }
            guard let dtype = StoredTensor.DType(rawValue: dtypeName) else {
                throw FileFormatError(path, "entry '\(name)' has unsupported dtype \(dtypeName)")
            }
            let width = dtype == .f32 ? 4 : 8
            var size: Int? = width
            for d in shape {
                guard let current = size, d >= 0 else { size = nil; break }
                let (product, overflow) = current.multipliedReportingOverflow(by: d)
                size = overflow ? nil : product
            }
            guard let size, size <= dataLength else {
                throw FileFormatError(path, "entry '\(name)': shape \(shape) is larger than the file")
            }
            guard offsets[0] >= 0, offsets[1] >= offsets[0], offsets[1] - offsets[0] == size else {
                throw FileFormatError(path, "entry '\(name)': data_offsets \(offsets) do not match shape \(shape) of \(dtypeName)")
            }
            guard offsets[1] <= dataLength else {
                throw FileFormatError(path, "truncated: entry '\(name)' ends at byte \(offsets[1]) of a \(dataLength)-byte data section")
            }
            tensors[name] = StoredTensor(dtype: dtype, shape: shape, bytes: Array(bytes[(dataStart + offsets[0])..<(dataStart + offsets[1])]))
            ranges.append((offsets[0], offsets[1], name))
        }
        // As the format requires, the entries tile the data section: no overlap (two names
        // reading the same bytes, or a name given twice, whose first entry the JSON parser drops),
        // no gap, nothing after the last.
        var end = 0
        for range in ranges.sorted(by: { ($0.start, $0.end) < ($1.start, $1.end) }) {
            guard range.start == end else {
                throw FileFormatError(path, range.start < end
                    ? "entry '\(range.name)' overlaps the bytes of another entry (data_offsets from \(range.start), previous end \(end))"
                    : "the data section has \(range.start - end) unclaimed bytes before entry '\(range.name)' (a duplicate name?)")
            }
            end = range.end
        }
        guard end == dataLength else { throw FileFormatError(path, "\(dataLength - end) bytes of data after the last entry") }
        return (tensors, metadata)
    }

    static func jsonString(_ text: String) -> String {
        let data = try! JSONSerialization.data(withJSONObject: [text])
        let array = String(decoding: data, as: UTF8.self)
        return String(array.dropFirst().dropLast())
    }
}
