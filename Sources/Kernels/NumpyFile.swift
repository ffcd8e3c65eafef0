import Foundation

/// A problem with a file a user gave us: which file, and what is wrong with it.
public struct FileFormatError: Error, CustomStringConvertible, Equatable {
    public let path: String
    public let problem: String
    public init(_ path: String, _ problem: String) {
        self.path = path
        self.problem = problem
    }
    public var description: String { "\(path): \(SettingNames.render(problem))" }
}

/// An array read from a NumPy `.npy` file (format versions 1–3, C order, little-endian).
///
/// Supported element types: f4, f8, i1, i2, i4, i8, u1, u2, u4, u8 and b1; values are converted
/// to the type the caller asks for.
public struct NumpyArray {
    public let shape: [Int]
    public let descriptor: String
    private let values: [Double]

    public var count: Int { values.count }

    public init(shape: [Int], descriptor: String, values: [Double]) {
        self.shape = shape
        self.descriptor = descriptor
        self.values = values
    }

    /// Reads `path`; any deviation from the format throws a ``FileFormatError`` naming the file.
    public init(contentsOf path: String) throws {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw FileFormatError(path, FileManager.default.fileExists(atPath: path) ? "cannot be read" : "no such file")
        }
        try self.init(data: data, path: path)
    }

    public init(data: Data, path: String) throws {
        let bytes = [UInt8](data)
        guard bytes.count >= 10, bytes[0] == 0x93, Array(bytes[1...5]) == Array("NUMPY".utf8) else {
            throw FileFormatError(path, "not a .npy file (missing the \\x93NUMPY magic)")
        }
        let major = bytes[6]
        let headerLength: Int, headerStart: Int
        switch major {
        case 1:
            headerLength = Int(bytes[8]) | Int(bytes[9]) << 8
            headerStart = 10
        case 2, 3:
            guard bytes.count >= 12 else { throw FileFormatError(path, "truncated .npy header") }
            headerLength = (0..<4).reduce(0) { $0 | Int(bytes[8 + $1]) << (8 * $1) }
            headerStart = 12
        default:
            throw FileFormatError(path, "unsupported .npy format version \(major)")
        }
        guard bytes.count >= headerStart + headerLength,
              let header = String(bytes: bytes[headerStart..<(headerStart + headerLength)], encoding: .utf8)
        else { throw FileFormatError(path, "truncated .npy header") }

        guard let descr = Self.field("descr", in: header).map({ $0.trimmingCharacters(in: CharacterSet(charactersIn: "'\"")) }) else {
            throw FileFormatError(path, "header has no 'descr'")
        }
        if let fortran = Self.field("fortran_order", in: header), fortran != "False" {
            throw FileFormatError(path, "Fortran-ordered arrays are not supported; save with np.ascontiguousarray")
        }
        guard let shapeText = Self.tuple("shape", in: header) else { throw FileFormatError(path, "header has no 'shape'") }
        let dims = shapeText.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        var shape: [Int] = []
        for d in dims {
            guard let v = Int(d), v >= 0 else { throw FileFormatError(path, "bad shape (\(shapeText))") }
            shape.append(v)
        }
        guard let (width, decode) = Self.decoder(for: descr) else {
            throw FileFormatError(path, "unsupported dtype '\(descr)' (use float32, float64 or an integer type)")
        }
        // Checked arithmetic: a crafted shape must give an error, not an overflow trap.
        var count = 1
        for d in shape {
            let (product, overflow) = count.multipliedReportingOverflow(by: d)
            guard !overflow, product <= bytes.count else {
                throw FileFormatError(path, "truncated: shape \(shape) needs more data than the file's \(bytes.count) bytes")
            }
            count = product
        }
        let start = headerStart + headerLength
        let needed = count * width
        guard bytes.count - start >= needed else {
            throw FileFormatError(path, "truncated: shape \(shape) needs \(needed) data bytes, file has \(bytes.count - start)")
        }
        guard bytes.count - start == needed else {
            throw FileFormatError(path, "\(bytes.count - start - needed) bytes of trailing data after the array")
        }
        var values = [Double](repeating: 0, count: count)
        bytes.withUnsafeBytes { raw in
            for i in 0..<count { values[i] = decode(raw, start + i * width) }
        }
        self.init(shape: shape, descriptor: descr, values: values)
    }

    public func scalars<T: BinaryFloatingPoint>(as _: T.Type = T.self) -> [T] { values.map { T($0) } }
    public func doubles() -> [Double] { values }

    /// The values as integers; nil when one is not integral.
    public func integers() -> [Int]? {
        var out = [Int]()
        out.reserveCapacity(values.count)
        for v in values {
            guard v.isFinite, v.rounded() == v, abs(v) < 9e15 else { return nil }
            out.append(Int(v))
        }
        return out
    }

    public func tensor<T: TensorScalar>(as _: T.Type = T.self) -> Tensor<T> {
        Tensor(shape: shape, scalars: scalars(as: T.self))
    }

    private static func field(_ key: String, in header: String) -> String? {
        guard let range = header.range(of: "'\(key)':") else { return nil }
        let rest = header[range.upperBound...].trimmingCharacters(in: .whitespaces)
        guard let end = rest.firstIndex(where: { $0 == "," || $0 == "}" }) else { return nil }
        return rest[..<end].trimmingCharacters(in: .whitespaces)
    }

    private static func tuple(_ key: String, in header: String) -> String? {
        guard let range = header.range(of: "'\(key)':"),
              let open = header[range.upperBound...].firstIndex(of: "("),
              let close = header[open...].firstIndex(of: ")") else { return nil }
        return String(header[header.index(after: open)..<close])
    }

    private static func decoder(for descr: String) -> (Int, (UnsafeRawBufferPointer, Int) -> Double)? {
        func little<T: FixedWidthInteger>(_: T.Type) -> (UnsafeRawBufferPointer, Int) -> Double {
            { raw, offset in Double(T(littleEndian: raw.loadUnaligned(fromByteOffset: offset, as: T.self))) }
        }
        switch descr {
        case "<f4", "=f4": return (4, { raw, o in Double(Float(bitPattern: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: o, as: UInt32.self)))) })
        case "<f8", "=f8": return (8, { raw, o in Double(bitPattern: UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: o, as: UInt64.self))) })
        case "|i1", "<i1": return (1, little(Int8.self))
        case "|u1", "<u1", "|b1": return (1, little(UInt8.self))
        case "<i2": return (2, little(Int16.self))
        case "<u2": return (2, little(UInt16.self))
        case "<i4": return (4, little(Int32.self))
        case "<u4": return (4, little(UInt32.self))
        case "<i8": return (8, little(Int64.self))
        case "<u8": return (8, little(UInt64.self))
        default: return nil
        }
    }
}

/// Writes `tensor` as a version-1 `.npy` file with the tensor's own dtype, atomically.
public func writeNumpy<T: TensorScalar>(_ tensor: Tensor<T>, to path: String) throws {
    let shapeText = tensor.shape.count == 1 ? "(\(tensor.shape[0]),)" : "(" + tensor.shape.map(String.init).joined(separator: ", ") + ")"
    var header = "{'descr': '\(T.numpyDescriptor)', 'fortran_order': False, 'shape': \(shapeText), }"
    // Pad so that the data starts on a 64-byte boundary, ending the header with a newline.
    let unpadded = 10 + header.utf8.count + 1
    header += String(repeating: " ", count: (64 - unpadded % 64) % 64) + "\n"
    var data = Data([0x93] + Array("NUMPY".utf8) + [1, 0])
    let length = UInt16(header.utf8.count)
    data.append(contentsOf: [UInt8(length & 0xFF), UInt8(length >> 8)])
    data.append(contentsOf: Array(header.utf8))
    tensor.scalars.withUnsafeBytes { data.append(contentsOf: $0) }
    try writeAtomically(data, to: path)
}

/// The temporary file a write to `path` goes through: hidden, beside it, and specific to this
/// process (`.NAME.partial-PID`).
public func temporaryPath(for path: String) -> String {
    let url = URL(fileURLWithPath: path)
    return url.deletingLastPathComponent().appendingPathComponent(".\(url.lastPathComponent).partial-\(getpid())").path
}

/// Removes temporary files that an earlier, killed write to `path` left beside it
/// (`.NAME.partial-PID`) — only those whose process is gone: a live writer's file is its own.
/// Returns how many it removed.
@discardableResult
public func removeStalePartialFiles(for path: String) -> Int {
    let url = URL(fileURLWithPath: path)
    let directory = url.deletingLastPathComponent().path
    let prefix = ".\(url.lastPathComponent).partial-"
    var removed = 0
    for name in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] where name.hasPrefix(prefix) {
        if let pid = Int32(name.dropFirst(prefix.count)), pid > 0, processIsAlive(pid) { continue }
        if unlink(directory + "/" + name) == 0 { removed += 1 }
    }
    return removed
}

/// Refuses an output path whose current occupant is not a regular file (a device, a directory,
/// a symbolic link, a FIFO): replacing it would destroy something that is not ours.
public func checkReplaceableOutput(_ path: String) throws {
    var info = stat()
    guard lstat(path, &info) == 0 else { return }   // a new name
    guard info.st_mode & S_IFMT == S_IFREG else {
        let kind: String
        switch info.st_mode & S_IFMT {
        case S_IFDIR: kind = "a directory"
        case S_IFLNK: kind = "a symbolic link"
        case S_IFCHR, S_IFBLK: kind = "a device"
        default: kind = "not a regular file"
        }
        throw FileFormatError(path, "is \(kind); refusing to replace it (give a regular file or a new name)")
    }
}

/// Writes `data` to a temporary file beside `path`, flushes it to disk (fsync), renames it over
/// `path` and flushes the directory, so that a reader never sees a half-written file and a crash
/// at any moment leaves either the previous file or the new one. The temporary file is removed
/// on any failure. An existing `path` that is not a regular file is refused.
public func writeAtomically(_ data: Data, to path: String) throws {
    try checkReplaceableOutput(path)
    let temporary = temporaryPath(for: path)
    func failure(_ what: String) -> FileFormatError {
        let reason = String(cString: strerror(errno))
        unlink(temporary)
        return FileFormatError(path, "cannot write (\(what)): \(reason)")
    }
    let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    guard fd >= 0 else { throw failure("create \(temporary)") }
    let written: Bool = data.withUnsafeBytes { raw in
        var offset = 0
        while offset < raw.count {
            let n = write(fd, raw.baseAddress! + offset, raw.count - offset)
            if n < 0 { if errno == EINTR { continue }; return false }
            offset += n
        }
        return true
    }
    guard written else { close(fd); throw failure("write") }
    guard fsync(fd) == 0 else { close(fd); throw failure("fsync") }
    guard close(fd) == 0 else { throw failure("close") }
    guard rename(temporary, path) == 0 else { throw failure("rename") }
    let directory = open(URL(fileURLWithPath: path).deletingLastPathComponent().path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    if directory >= 0 {
        _ = fsync(directory)
        close(directory)
    }
}
