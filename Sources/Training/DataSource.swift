import CGzip
import Foundation
import Kernels

/// Where training data comes from, as given to `--data`:
///
/// - `synthetic` or `synthetic:train=N,heldout=N,seed=S` — the built-in images (default
///   8192 / 2048 samples, seed 0);
/// - `idx:IMAGES,LABELS` — MNIST-style IDX files (unsigned-byte images N×H×W or N×C×H×W,
///   labels N);
/// - `fashion-mnist` or `fashion-mnist:DIR` — Fashion-MNIST's gzipped IDX files (Debian's
///   `dataset-fashion-mnist`, default DIR `/usr/share/datasets/fashion-mnist`), with its
///   10,000-image test set as the held-out set;
/// - `cifar10:DIR` — CIFAR-10 binary batches: `data_batch_*.bin` for training and
///   `test_batch.bin`, when present, as the held-out set;
/// - `npy:X,Y` — samples X (N×C×H×W, N×H×W or N×F, any numeric dtype) and integer labels Y (N).
///
/// For sources without their own held-out set, the last `heldOutFraction` of the samples is held
/// out (or `--eval-data` names a second source).
public enum DataSource: Equatable, Sendable, CustomStringConvertible {
    case synthetic(train: Int, heldOut: Int, seed: UInt64)
    case idx(images: String, labels: String)
    case cifar10(directory: String)
    case npy(samples: String, labels: String)
    case fashionMNIST(directory: String)
    /// SRC and an intensity-inverted copy of it as domain 1 (training and held-out sets).
    indirect case twoDomain(DataSource)
    /// SRC and a copy of it changed by `shift` as domain 1 (`two-domain-shrunk:SRC`,
    /// `two-domain-contrast:SRC`).
    indirect case shiftedDomain(DataSource, DomainShift)
    /// npy:X,Y,D — samples, labels and a domain label per sample.
    case npyWithDomains(samples: String, labels: String, domains: String)

    /// Where Debian's `dataset-fashion-mnist` puts the files.
    public static let fashionMNISTDirectory = "/usr/share/datasets/fashion-mnist"

    public static let defaultSynthetic = DataSource.synthetic(train: 8192, heldOut: 2048, seed: 0)

    public var description: String {
        switch self {
        case let .synthetic(train, heldOut, seed): return "synthetic:train=\(train),heldout=\(heldOut),seed=\(seed)"
        case let .idx(images, labels): return "idx:\(images),\(labels)"
        case let .cifar10(directory): return "cifar10:\(directory)"
        case let .npy(samples, labels): return "npy:\(samples),\(labels)"
        case let .fashionMNIST(directory): return "fashion-mnist:\(directory)"
        case let .twoDomain(source): return "two-domain:\(source)"
        case let .shiftedDomain(source, shift): return "two-domain-\(shift.rawValue):\(source)"
        case let .npyWithDomains(samples, labels, domains): return "npy:\(samples),\(labels),\(domains)"
        }
    }

    /// Parses a `--data` value; the error says what form was expected.
    public init(parsing text: String) throws {
        let (kind, rest): (String, String) = {
            guard let colon = text.firstIndex(of: ":") else { return (text, "") }
            return (String(text[..<colon]), String(text[text.index(after: colon)...]))
        }()
        func pair() throws -> (String, String) {
            let parts = rest.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
            guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else {
                throw DataError("⟨data⟩ \(kind): expected \(kind):FILE1,FILE2, got '\(text)'")
            }
            return (parts[0], parts[1])
        }
        switch kind {
        case "synthetic":
            var train = 8192, heldOut = 2048, seed: UInt64 = 0
            for item in rest.split(separator: ",") where !item.isEmpty {
                let kv = item.split(separator: "=", maxSplits: 1).map(String.init)
                guard kv.count == 2, let value = Int(kv[1]), value >= 0 else {
                    throw DataError("⟨data⟩ synthetic: expected train=N,heldout=N,seed=S, got '\(item)'")
                }
                switch kv[0] {
                case "train": train = value
                case "heldout": heldOut = value
                case "seed": seed = UInt64(value)
                default: throw DataError("⟨data⟩ synthetic: unknown option '\(kv[0])' (train, heldout, seed)")
                }
            }
            guard train >= 2, heldOut >= 1 else { throw DataError("⟨data⟩ synthetic: need train ≥ 2 and heldout ≥ 1") }
            // Known before anything is allocated.
            try DataMemory.check(values: (Double(train) + Double(heldOut)) * Double(SyntheticImages.sampleShape.reduce(1, *)),
                                 what: "⟨data⟩ synthetic: \(train) + \(heldOut) samples")
            self = .synthetic(train: train, heldOut: heldOut, seed: seed)
        case "idx":
            let (a, b) = try pair()
            self = .idx(images: a, labels: b)
        case "npy":
            let parts = rest.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
            if parts.count == 3, parts.allSatisfy({ !$0.isEmpty }) {
                self = .npyWithDomains(samples: parts[0], labels: parts[1], domains: parts[2])
            } else {
                let (a, b) = try pair()
                self = .npy(samples: a, labels: b)
            }
        case "two-domain":
            guard !rest.isEmpty else { throw DataError("⟨data⟩ two-domain: expected two-domain:SOURCE (e.g. two-domain:fashion-mnist)") }
            let inner = try DataSource(parsing: rest)
            if case .twoDomain = inner { throw DataError("⟨data⟩ two-domain: the source already has two domains") }
            if case .shiftedDomain = inner { throw DataError("⟨data⟩ two-domain: the source already has two domains") }
            self = .twoDomain(inner)
        case "two-domain-shrunk", "two-domain-contrast":
            let shift = DomainShift(rawValue: String(kind.dropFirst("two-domain-".count)))!
            guard !rest.isEmpty else { throw DataError("⟨data⟩ \(kind): expected \(kind):SOURCE (e.g. \(kind):fashion-mnist)") }
            let inner = try DataSource(parsing: rest)
            switch inner {
            case .twoDomain, .shiftedDomain, .npyWithDomains: throw DataError("⟨data⟩ \(kind): the source already has domains")
            default: break
            }
            self = .shiftedDomain(inner, shift)
        case "fashion-mnist":
            self = .fashionMNIST(directory: rest.isEmpty ? Self.fashionMNISTDirectory : rest)
        case "cifar10":
            guard !rest.isEmpty else { throw DataError("⟨data⟩ cifar10: expected cifar10:DIRECTORY") }
            self = .cifar10(directory: rest)
        default:
            throw DataError("⟨data⟩: unknown source '\(kind)' (synthetic, fashion-mnist[:DIR], idx:IMAGES,LABELS, cifar10:DIR, npy:X,Y[,D], two-domain:SOURCE, two-domain-shrunk:SOURCE, two-domain-contrast:SOURCE)")
        }
    }

    /// Loads the source: a training set and, when the source has one, a held-out set.
    public func load() throws -> (train: Dataset, heldOut: Dataset?) {
        switch self {
        case let .synthetic(train, heldOut, seed):
            let split = SyntheticImages.make(trainCount: train, heldOutCount: heldOut, seed: seed)
            return (split.train, split.heldOut)
        case let .idx(images, labels):
            return (try IDXFormat.load(images: images, labels: labels), nil)
        case let .npy(samples, labels):
            return (try loadNumpyPair(samples: samples, labels: labels), nil)
        case let .cifar10(directory):
            return try CIFAR10Format.load(directory: directory)
        case let .twoDomain(source):
            let (train, heldOut) = try source.load()
            return (train.withInvertedDomain(), heldOut?.withInvertedDomain())
        case let .shiftedDomain(source, shift):
            let (train, heldOut) = try source.load()
            return (try train.withSecondDomain(shift), try heldOut?.withSecondDomain(shift))
        case let .npyWithDomains(samples, labels, domains):
            var data = try loadNumpyPair(samples: samples, labels: labels)
            let array = try NumpyArray(contentsOf: domains)
            guard array.shape == [data.count] else {
                throw FileFormatError(domains, "holds \(array.shape) domain labels; expected one per sample, [\(data.count)]")
            }
            let values = array.doubles()
            guard values.allSatisfy({ $0 >= 0 && $0 < 64 && $0 == $0.rounded() }) else {
                throw FileFormatError(domains, "domain labels must be integers in 0..<64")
            }
            data.domains = values.map { Int32($0) }
            return (data, nil)
        case let .fashionMNIST(directory):
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory), isDirectory.boolValue else {
                throw FileFormatError(directory, "no such directory" + (directory == Self.fashionMNISTDirectory
                    ? "; install Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist)" : ""))
            }
            let file = { (name: String) in directory + "/" + name }
            let train = try IDXFormat.load(images: file("train-images-idx3-ubyte.gz"), labels: file("train-labels-idx1-ubyte.gz"))
            let test = try IDXFormat.load(images: file("t10k-images-idx3-ubyte.gz"), labels: file("t10k-labels-idx1-ubyte.gz"))
            return (train, test)
        }
    }

    /// The training and held-out sets: the source's own held-out set, `evaluation`'s samples, or
    /// the last `heldOutFraction` of the source — cut to the first `trainLimit` / `evalLimit`
    /// samples when given, then standardized with the (kept) training samples' moments.
    public static func split(_ source: DataSource, evaluation: DataSource?, heldOutFraction: Double,
                             trainLimit: Int? = nil, evalLimit: Int? = nil) throws -> DataSplit {
        let (train, ownHeldOut) = try source.load()
        guard train.sampleShape.allSatisfy({ $0 > 0 }) else {
            throw DataError("\(source): samples of shape \(train.sampleShape) have an empty dimension")
        }
        var split: DataSplit
        if let evaluation {
            let (evalSet, _) = try evaluation.load()
            guard evalSet.sampleShape == train.sampleShape else {
                throw DataError("⟨evalData⟩ samples have shape \(evalSet.sampleShape), training samples \(train.sampleShape)")
            }
            split = DataSplit(train: train, heldOut: evalSet)
        } else if let ownHeldOut {
            split = DataSplit(train: train, heldOut: ownHeldOut)
        } else {
            let heldOut = Int((Double(train.count) * heldOutFraction).rounded())
            guard heldOut >= 1, train.count - heldOut >= 2 else {
                throw DataError("\(source): \(train.count) samples are too few to hold out \(Int(heldOutFraction * 100))% for evaluation")
            }
            split = DataSplit(train: train.subset(0..<(train.count - heldOut)), heldOut: train.subset((train.count - heldOut)..<train.count))
        }
        if let trainLimit, trainLimit < split.train.count { split.train = split.train.subset(0..<max(trainLimit, 0)) }
        if let evalLimit, evalLimit < split.heldOut.count { split.heldOut = split.heldOut.subset(0..<max(evalLimit, 0)) }
        let classes = max(split.train.classes, split.heldOut.classes)
        let (trainDomains, heldOutDomains) = (split.train.domains, split.heldOut.domains)
        split.train = Dataset(sampleShape: split.train.sampleShape, classes: classes, samples: split.train.samples, labels: split.train.labels)
        split.heldOut = Dataset(sampleShape: split.heldOut.sampleShape, classes: classes, samples: split.heldOut.samples, labels: split.heldOut.labels)
        split.train.domains = trainDomains
        split.heldOut.domains = heldOutDomains
        split.standardize()
        return split
    }
}

/// A problem with the data a user pointed us at.
public struct DataError: Error, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { SettingNames.render(message) }
}

func readFile(_ path: String) throws -> [UInt8] {
    try requireReadableFile(path)
    guard let data = FileManager.default.contents(atPath: path) else { throw FileFormatError(path, "cannot be read") }
    return [UInt8](data)
}

/// A file that exists and is not a directory, or the error that says which.
func requireReadableFile(_ path: String) throws {
    var isDirectory: ObjCBool = false
    guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else { throw FileFormatError(path, "no such file") }
    guard !isDirectory.boolValue else { throw FileFormatError(path, "is a directory, expected a file") }
}

/// Labels must be integers in 0 ..< 65536; the class count is max + 1.
func checkedLabels(_ values: [Int], path: String) throws -> (labels: [Int32], classes: Int) {
    guard let bad = values.first(where: { $0 < 0 || $0 >= 65536 }) else {
        return (values.map { Int32($0) }, (values.max() ?? 0) + 1)
    }
    throw FileFormatError(path, "label \(bad) is not a class index in 0..<65536")
}

/// The largest decompressed file accepted (4 GiB): a bound against gzip bombs and absurd sizes.
let maximumDecompressedSize = 1 << 32

/// The bytes of a gzip file, decompressed with zlib (all members).
func gunzip(_ compressed: [UInt8], path: String, maximum: Int = maximumDecompressedSize) throws -> [UInt8] {
    var output: UnsafeMutablePointer<UInt8>?
    var length = 0
    var message = [CChar](repeating: 0, count: 256)
    let status = compressed.withUnsafeBufferPointer { input in
        cgzip_decompress(input.baseAddress, input.count, min(maximum, maximumDecompressedSize), &output, &length, &message, message.count)
    }
    guard status == 0, let output else {
        let text = String(decoding: message.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        throw FileFormatError(path, "cannot decompress: \(text)")
    }
    defer { free(output) }
    return Array(UnsafeBufferPointer(start: output, count: length))
}

/// The first `count` decompressed bytes of a gzip file (fewer when it is shorter), the rest left
/// compressed.
func gunzipPrefix(_ compressed: [UInt8], count: Int, path: String) throws -> [UInt8] {
    var output = [UInt8](repeating: 0, count: count)
    var length = 0
    let status = compressed.withUnsafeBufferPointer { input in
        output.withUnsafeMutableBufferPointer { cgzip_peek(input.baseAddress, input.count, $0.baseAddress, count, &length) }
    }
    guard status == 0 else { throw FileFormatError(path, "cannot decompress: corrupt gzip data") }
    return Array(output.prefix(length))
}

/// How much memory the loaded data may take: a bound checked from each file's header (or a
/// synthetic source's counts) before the samples are allocated, so that a crafted header or a
/// gzip bomb is one line, not a failed allocation minutes later.
public enum DataMemory {
    /// The budget in bytes (`--max-data-bytes`); nil: ``defaultBudget``.
    nonisolated(unsafe) public static var budget: Int?

    /// Half of this machine's memory, shared by the ranks mpirun starts on it (each loads its own
    /// copy).
    public static var defaultBudget: Int {
        let local = ProcessInfo.processInfo.environment["OMPI_COMM_WORLD_LOCAL_SIZE"].flatMap { Int($0) }.map { max($0, 1) } ?? 1
        return Int(ProcessInfo.processInfo.physicalMemory / 2) / local
    }

    /// Refuses `values` samples' values (4 bytes each, as Float) beyond the budget.
    static func check(values: Double, what: String) throws {
        let needed = values * 4, limit = Double(budget ?? defaultBudget)
        guard needed > limit else { return }
        let gib = { (bytes: Double) in
            bytes >= 1_073_741_824 ? String(format: "%.2f GiB", bytes / 1_073_741_824) : String(format: "%.1f MiB", bytes / 1_048_576)
        }
        let origin = budget == nil ? "half of this machine's memory over its ranks; raise it with ⟨maxDataBytes⟩" : "⟨maxDataBytes⟩"
        throw DataError("\(what) need \(gib(needed)) as Float, more than the data budget of \(gib(limit)) (\(origin))")
    }
}

/// MNIST's IDX format: magic 0x0000, a type byte (0x08 = unsigned byte), a dimension count, the
/// dimensions as big-endian UInt32, then the data. Gzipped files (`.gz`, or the gzip magic
/// 1f 8b) are decompressed first.
enum IDXFormat {
    static func read(_ path: String) throws -> (dims: [Int], values: [UInt8]) {
        var bytes = try readFile(path)
        if bytes.count >= 2 && bytes[0] == 0x1F && bytes[1] == 0x8B {
            // The header first: what the dimensions need is checked before anything is inflated,
            // and the data may not inflate past what they declare.
            let head = try gunzipPrefix(bytes, count: 4 + 4 * 255, path: path)
            let (dims, count) = try header(head, path: path)
            try DataMemory.check(values: Double(count), what: "\(path): dimensions \(dims)")
            bytes = try gunzip(bytes, path: path, maximum: 4 + 4 * dims.count + count)
        } else if path.hasSuffix(".gz") {
            throw FileFormatError(path, "named .gz but is not gzip data")
        }
        let (dims, count) = try header(bytes, path: path)
        try DataMemory.check(values: Double(count), what: "\(path): dimensions \(dims)")
        let start = 4 + 4 * dims.count
        guard bytes.count - start >= count else {
            throw FileFormatError(path, "truncated: dimensions \(dims) need \(count) bytes of data, file has \(bytes.count - start)")
        }
        guard bytes.count - start == count else { throw FileFormatError(path, "\(bytes.count - start - count) bytes of trailing data") }
        return (dims, Array(bytes[start...]))
    }

    /// The dimensions an IDX header declares and their product, or the error naming the file.
    static func header(_ bytes: [UInt8], path: String) throws -> (dims: [Int], count: Int) {
        guard bytes.count >= 4, bytes[0] == 0, bytes[1] == 0 else { throw FileFormatError(path, "not an IDX file (bad magic number)") }
        guard bytes[2] == 0x08 else { throw FileFormatError(path, String(format: "IDX element type 0x%02x is not supported (only unsigned bytes, 0x08)", bytes[2])) }
        let ndims = Int(bytes[3])
        guard ndims >= 1, bytes.count >= 4 + 4 * ndims else { throw FileFormatError(path, "truncated IDX header") }
        let dims = (0..<ndims).map { d in (0..<4).reduce(0) { $0 << 8 | Int(bytes[4 + 4 * d + $1]) } }
        var count = 1
        for d in dims {
            let (product, overflow) = count.multipliedReportingOverflow(by: d)
            guard !overflow, product <= maximumDecompressedSize else {
                throw FileFormatError(path, "dimensions \(dims) are too large")
            }
            count = product
        }
        return (dims, count)
    }

    static func load(images: String, labels: String) throws -> Dataset {
        let (imageDims, pixels) = try read(images)
        let (labelDims, labelBytes) = try read(labels)
        guard imageDims.count == 3 || imageDims.count == 4 else {
            throw FileFormatError(images, "expected N×H×W or N×C×H×W images, got dimensions \(imageDims)")
        }
        guard labelDims.count == 1 else { throw FileFormatError(labels, "expected a 1-D label file, got dimensions \(labelDims)") }
        guard imageDims[0] == labelDims[0] else {
            throw FileFormatError(labels, "has \(labelDims[0]) labels but \(images) has \(imageDims[0]) images")
        }
        let sampleShape = imageDims.count == 3 ? [1, imageDims[1], imageDims[2]] : Array(imageDims.dropFirst())
        let (checked, classes) = try checkedLabels(labelBytes.map(Int.init), path: labels)
        return Dataset(sampleShape: sampleShape, classes: classes, samples: pixels.map { Float($0) / 255 }, labels: checked)
    }
}

/// CIFAR-10's binary version: records of 1 label byte and 3072 pixel bytes (3×32×32).
enum CIFAR10Format {
    static let recordSize = 1 + 3 * 32 * 32

    static func read(_ path: String) throws -> (samples: [Float], labels: [Int32]) {
        let bytes = try readFile(path)
        guard !bytes.isEmpty, bytes.count % recordSize == 0 else {
            throw FileFormatError(path, "size \(bytes.count) is not a multiple of the \(recordSize)-byte CIFAR-10 record (truncated?)")
        }
        let records = bytes.count / recordSize
        try DataMemory.check(values: Double(records * (recordSize - 1)), what: "\(path): \(records) records")
        var samples = [Float](repeating: 0, count: records * (recordSize - 1))
        var labels = [Int32](repeating: 0, count: records)
        for r in 0..<records {
            let label = bytes[r * recordSize]
            guard label < 10 else { throw FileFormatError(path, "record \(r) has label \(label), CIFAR-10 labels are 0…9") }
            labels[r] = Int32(label)
            for i in 0..<(recordSize - 1) { samples[r * (recordSize - 1) + i] = Float(bytes[r * recordSize + 1 + i]) / 255 }
        }
        return (samples, labels)
    }

    static func load(directory: String) throws -> (Dataset, Dataset?) {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw FileFormatError(directory, "no such directory")
        }
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        let trainFiles = names.filter { $0.hasPrefix("data_batch_") && $0.hasSuffix(".bin") }.sorted()
        guard !trainFiles.isEmpty else { throw FileFormatError(directory, "contains no data_batch_*.bin files (CIFAR-10 binary version)") }
        var samples: [Float] = [], labels: [Int32] = []
        for name in trainFiles {
            let part = try read(directory + "/" + name)
            samples += part.samples
            labels += part.labels
        }
        let shape = [3, 32, 32]
        let train = Dataset(sampleShape: shape, classes: 10, samples: samples, labels: labels)
        guard names.contains("test_batch.bin") else { return (train, nil) }
        let test = try read(directory + "/test_batch.bin")
        return (train, Dataset(sampleShape: shape, classes: 10, samples: test.samples, labels: test.labels))
    }
}

func loadNumpyPair(samples: String, labels: String) throws -> Dataset {
    let x = try NumpyArray(contentsOf: samples)
    let y = try NumpyArray(contentsOf: labels)
    guard (2...4).contains(x.shape.count) else {
        throw FileFormatError(samples, "expected N×F, N×H×W or N×C×H×W samples, got shape \(x.shape)")
    }
    guard y.shape.count == 1 else { throw FileFormatError(labels, "expected N labels, got shape \(y.shape)") }
    guard x.shape[0] == y.shape[0] else {
        throw FileFormatError(labels, "has \(y.shape[0]) labels but \(samples) has \(x.shape[0]) samples")
    }
    try DataMemory.check(values: Double(x.count), what: "\(samples): shape \(x.shape)")
    let values: [Float] = x.scalars()
    if let bad = values.firstIndex(where: { !$0.isFinite }) {
        throw FileFormatError(samples, "value \(bad) is not finite (\(values[bad]))")
    }
    guard let integers = y.integers() else { throw FileFormatError(labels, "labels must be integers") }
    let (checked, classes) = try checkedLabels(integers, path: labels)
    let sampleShape: [Int]
    switch x.shape.count {
    case 2: sampleShape = [x.shape[1]]
    case 3: sampleShape = [1, x.shape[1], x.shape[2]]
    default: sampleShape = Array(x.shape.dropFirst())
    }
    return Dataset(sampleShape: sampleShape, classes: classes, samples: values, labels: checked)
}
