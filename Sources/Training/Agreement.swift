import Collectives
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Kernels

/// What every rank of a job must agree on before training starts, and the check that they do.
///
/// Ranks started with different settings (an MPMD launch, per-node copies of the data that
/// differ) would otherwise train to the end on silently wrong numbers, hang in mismatched
/// collectives, or fail with MPI's own errors. One all-gather of a hash per setting finds any
/// difference; only then is a second all-gather spent on the differing values, so that rank 0 can
/// say which setting differs and which ranks hold each value.
public struct RunAgreement {
    /// (setting, value) in a fixed order; the setting is named as the user knows it (a flag).
    public private(set) var settings: [(name: String, value: String)] = []

    public init() {}

    /// The flags of `syncbn-train train` that every rank must give alike beside the training
    /// configuration's fields (each added by the command under this name).
    public static let comparedFlags = ["--sync-group-size node", "--sync-group-size all", "--resume", "--save", "--save-every", "--resume auto",
                                       "--reset-cbn-windows", "--overwrite-metrics", "--check-collectives",
                                       "--collective-timeout", "--allow-config-change"]

    /// The flags that may differ between ranks, and why: every other flag is compared.
    public static let rankLocalFlags: [String: String] = [
        "--data": "where the data lives on each host; the contents are compared",
        "--eval-data": "the same for the held-out set",
        "--metrics": "only rank 0 writes it",
        "--save": "only rank 0 writes it (whether it is given is compared)",
        "--log-every": "only rank 0 logs",
        "--max-data-bytes": "each host's own memory",
        "--simulate-ranks": "not an MPI job: one process runs every rank",
    ]

    public mutating func add(_ name: String, _ value: String) { settings.append((name, value)) }

    /// Every field of the training configuration, under its flag's name.
    public mutating func add(configuration: TrainingConfiguration) throws {
        let data = try JSONEncoder().encode(configuration)
        guard let object = try JSONSerialization.jsonObject(with: data) as? [String: Any] else { return }
        func flatten(_ value: Any, _ path: String) {
            if let dictionary = value as? [String: Any] {
                for key in dictionary.keys.sorted() { flatten(dictionary[key]!, path.isEmpty ? key : path + "." + key) }
            } else if let string = value as? String {
                add(Self.flagName(path), string)
            } else {
                let text = (try? JSONSerialization.data(withJSONObject: [value], options: [.sortedKeys]))
                    .map { String(decoding: $0.dropFirst().dropLast(), as: UTF8.self) } ?? "\(value)"
                add(Self.flagName(path), text)
            }
        }
        // Optional fields are absent from the JSON when nil: each gets exactly one entry, "unset"
        // or its value, so that "set on some ranks only" is a difference like any other.
        let optional: Set = ["steps", "syncGroupSize", "ghostBatchSize", "freezeBNAfter", "preciseBNBatchSize",
                             "lrReferenceBatch", "warmupEpochs", "warmupSteps", "trainSamples", "evalSamples"]
        // Settings that may differ: where the data lives (the data's content is compared
        // instead: see add(data:as:)) and how often rank 0 logs.
        let perRank: Set = ["data", "evalData", "logEvery"]
        for key in object.keys.sorted() where !optional.contains(key) && !perRank.contains(key) { flatten(object[key]!, key) }
        for key in optional.sorted() {
            if let value = object[key] { flatten(value, key) } else { add(Self.flagName(key), "unset") }
        }
    }

    /// A data set's size, shape, classes and a hash of its whole content (every sample and label,
    /// in order): two copies that differ in one value or in the order of two samples differ here.
    public mutating func add(data: Dataset, as name: String) {
        var hash = ContentHash()
        data.labels.withUnsafeBufferPointer { labels in
            for label in labels { hash.mix(UInt64(bitPattern: Int64(label))) }
        }
        data.samples.withUnsafeBufferPointer { samples in
            var index = 0
            // Two floats per word, then the odd one.
            while index + 1 < samples.count {
                hash.mix(UInt64(samples[index].bitPattern) | UInt64(samples[index + 1].bitPattern) << 32)
                index += 2
            }
            if index < samples.count { hash.mix(UInt64(samples[index].bitPattern)) }
        }
        add(name, "\(data.count) samples of \(data.sampleShape), \(data.classes) classes, content \(hash.text)")
    }

    /// A file's identity: its size and a hash of all its bytes.
    public mutating func add(file path: String, as name: String) {
        guard let handle = FileHandle(forReadingAtPath: path) else { return add(name, "unreadable \(path)") }
        defer { try? handle.close() }
        var hash = ContentHash()
        var size = 0
        var pending = Data()
        while true {
            let chunk = (try? handle.read(upToCount: 1 << 22)) ?? Data()
            if chunk.isEmpty { break }
            size += chunk.count
            pending.append(chunk)
            // Whole words only until the end, however the reads fall.
            let whole = pending.count / 8 * 8
            hash.mix(bytes: pending.prefix(whole))
            pending = Data(pending.dropFirst(whole))
        }
        hash.mix(bytes: pending)
        add(name, "\(size) bytes, content \(hash.text)")
    }

    /// Checks that every rank of `world` holds the same settings. Collective. On a difference
    /// every rank throws the same ``CollectiveRunError`` naming the differing settings and which
    /// ranks hold each value.
    public func check(_ world: any Communicator) throws {
        guard world.size > 1 else { return }
        let hashes = settings.map { Int64(bitPattern: Self.hash($0.name + "=" + $0.value)) }
        let names = Int64(bitPattern: Self.hash(settings.map(\.name).joined(separator: ",")))
        let all = try world.allGather([names] + hashes)
        guard all.contains(where: { $0 != all[0] }) else { return }
        guard all.allSatisfy({ $0.first == names && $0.count == all[0].count }) else {
            throw CollectiveRunError("ranks run different versions of syncbn-train (their settings differ in kind); start every rank with the same binary")
        }
        let differing = (0..<settings.count).filter { i in all.contains { $0[i + 1] != all[0][i + 1] } }
        // The values of the differing settings, as bytes, from every rank.
        let text = differing.map { settings[$0].value }.joined(separator: "\u{1F}")
        let values = try world.allGather(Array(text.utf8).map { Int64($0) })
            .map { String(decoding: $0.map { UInt8(truncatingIfNeeded: $0) }, as: UTF8.self).components(separatedBy: "\u{1F}") }
        var parts: [String] = []
        for (position, index) in differing.enumerated() {
            var holders: [(value: String, ranks: [Int])] = []
            for (rank, rankValues) in values.enumerated() {
                let value = position < rankValues.count ? rankValues[position] : "?"
                if let i = holders.firstIndex(where: { $0.value == value }) { holders[i].ranks.append(rank) } else { holders.append((value, [rank])) }
            }
            parts.append("\(settings[index].name) is " + holders.map { "\($0.value) on \(Self.describe(ranks: $0.ranks))" }.joined(separator: " but "))
        }
        throw CollectiveRunError("ranks were started with different settings: " + parts.joined(separator: "; "))
    }

    /// `--sync-group-size node`: the number of ranks per host, when every host runs the same
    /// number of consecutive ranks (mpirun's default placement). The host is `SYNCBN_NODE_NAME`
    /// when set (containers that share a host name), else the host name. Collective; every rank
    /// gets the same answer or the same error.
    public static func nodeGroupSize(_ world: any Communicator) throws -> Int {
        let name = ProcessInfo.processInfo.environment["SYNCBN_NODE_NAME"] ?? {
            var buffer = [CChar](repeating: 0, count: 256)
            return gethostname(&buffer, buffer.count) == 0 ? String(cString: buffer) : "unknown"
        }()
        let hosts = try world.allGather([Int64(bitPattern: hash(name))]).map { $0[0] }
        var runs: [(host: Int64, ranks: Int)] = []
        for host in hosts {
            if let last = runs.last, last.host == host { runs[runs.count - 1].ranks += 1 } else { runs.append((host, 1)) }
        }
        guard Set(runs.map(\.host)).count == runs.count else {
            throw CollectiveRunError("--sync-group-size node: a host's ranks are not consecutive (ranks placed round-robin?); start them with mpirun's default placement (--map-by slot) or give a group size")
        }
        guard Set(runs.map(\.ranks)).count == 1 else {
            throw CollectiveRunError("--sync-group-size node: the hosts run different numbers of ranks (\(runs.map { String($0.ranks) }.joined(separator: ", "))); give every host the same slots or a group size")
        }
        return runs[0].ranks
    }

    static func describe(ranks: [Int]) -> String {
        ranks.count == 1 ? "rank \(ranks[0])" : "ranks " + ranks.map(String.init).joined(separator: ",")
    }

    static func hash(_ text: String) -> UInt64 {
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        for byte in text.utf8 { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01B3 }
        return hash
    }

    /// The command-line flag of a configuration field (`batchSize` → `--batch-size`).
    public static func flagName(_ field: String) -> String {
        let special = ["learningRate": "--lr", "crossIteration.window": "--cbn-window", "crossIteration.rho": "--cbn-rho",
                       "crossIteration.burnIn": "--cbn-burnin", "crossIteration.gradient": "--cbn-gradient",
                       "normalizationDiagnostics": "--cbn-diagnostics", "inTrackRunningStats": "--in-track-running-stats", "shuffleBN": "--shuffle-bn", "domainBN": "--domain-bn", "gradientBucketSize": "--bucket-size",
                       "heldOutFraction": "--holdout-fraction", "brnRMax": "--brn-rmax", "brnDMax": "--brn-dmax",
                       "augmentation.crop": "--augment (crop)", "augmentation.flip": "--augment (flip)", "augmentation.padding": "--pad",
                       "preciseBNSamples": "--precise-bn-samples", "preciseBNBatchSize": "--precise-bn-batch-size",
                       "freezeBNAfter": "--freeze-bn-after", "bnEpsilon": "BN epsilon", "evalBatchSize": "evaluation batch size",
                       "augmentation": "--augment", "resetCrossIterationWindows": "--reset-cbn-windows", "metrics": "--metrics"]
        if let name = special[field] { return name }
        var result = "--"
        for character in field {
            if character.isUppercase { result += "-" + character.lowercased() } else { result.append(character) }
        }
        return result
    }
}

/// A 64-bit content hash (FNV-1a's step on 64-bit words, with a final avalanche): order-sensitive,
/// for telling copies apart, not for security.
struct ContentHash {
    private var state: UInt64 = 0xCBF2_9CE4_8422_2325
    private var words: UInt64 = 0

    mutating func mix(_ word: UInt64) {
        state = (state ^ word) &* 0x100_0000_01B3
        state ^= state >> 29
        words &+= 1
    }

    /// Bytes in order, eight to a word (the last word zero-padded, the count mixed in by `text`).
    mutating func mix(bytes: Data) {
        bytes.withUnsafeBytes { (raw: UnsafeRawBufferPointer) in
            var offset = 0
            while offset + 8 <= raw.count {
                mix(raw.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
                offset += 8
            }
            if offset < raw.count {
                var last: UInt64 = 0
                for (shift, byte) in raw[offset...].enumerated() { last |= UInt64(byte) << (8 * UInt64(shift)) }
                mix(last)
            }
        }
    }

    var text: String {
        var value = state ^ words &* 0x9E37_79B9_7F4A_7C15
        value = (value ^ (value >> 33)) &* 0xFF51_AFD7_ED55_8CCD
        value ^= value >> 33
        return String(value, radix: 16)
    }
}
