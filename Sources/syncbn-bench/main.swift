import ArgumentParser
import CollectiveChecks
import Collectives
import CollectivesMPI
import Foundation
import CommandSupport
import Kernels
import Normalization
import Training

/// `syncbn-bench`: benchmarks and layer-level verification against NumPy/PyTorch.
struct SyncBNBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "syncbn-bench",
        abstract: "Benchmark and verify syncbn's layers and collectives (run under mpirun for several ranks).",
        subcommands: [Limits.self, LayerBench.self, ConvBench.self, AllReduceBench.self, TrainBench.self, SelfTest.self])
}

/// One BN layer forward + backward, sharded over the ranks of the job.
struct LayerBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "layer",
        abstract: "Run one BatchNorm/SyncBatchNorm layer forward and backward over the job's ranks.",
        discussion: """
        The batch (first dimension) is split into contiguous pieces over the ranks, sizes differing by \
        at most one. --out DIR writes, gathered on rank 0: y.npy, dx.npy, dgamma.npy, dbeta.npy (summed over \
        ranks), mean.npy, var.npy (biased batch variance), running_mean.npy, running_var.npy (one update \
        from 0/1 with momentum 0.1). With --norm bn and several ranks the statistics are per rank and \
        those four files have one row per rank. --repeat K times K more iterations and prints the median \
        time per iteration and the effective bandwidth: forward reads x twice and writes y, backward \
        reads x and dy and writes dx — 6 × 4 bytes per element per iteration.
        """)

    @Option(help: "Input shape N,C,H,W or N,C (random N(0,1) input and gradient).")
    var shape: String?
    @Option(help: "Input .npy (N×C×H×W or N×C).")
    var input: String?
    @Option(help: "Output gradient .npy (same shape as the input; default: random).")
    var grad: String?
    @Option(help: "γ .npy (C values; default 1).")
    var gamma: String?
    @Option(help: "β .npy (C values; default 0).")
    var beta: String?
    @Option(help: "bn (per-rank statistics) or syncbn (statistics over all ranks).")
    var norm: String = "syncbn"
    @Option(help: "Directory for the output .npy files (rank 0).")
    var out: String?
    @Option(name: .customLong("repeat"), help: "Time this many extra iterations.")
    var repetitions: Int = 0
    @Option(help: "Seed for random input.")
    var seed: UInt64 = 0

    func validate() throws {
        guard (shape == nil) != (input == nil) else { throw ValidationError("give exactly one of --shape and --input") }
        guard norm == "bn" || norm == "syncbn" else { throw ValidationError("--norm must be bn or syncbn, got '\(norm)'") }
        guard repetitions >= 0 && repetitions <= 1_000_000 else { throw ValidationError("--repeat must be between 0 and 1000000, got \(repetitions)") }
        if let shape {
            let dims = shape.split(separator: ",").map { Int($0.trimmingCharacters(in: .whitespaces)) }
            guard dims.count == 2 || dims.count == 4, dims.allSatisfy({ ($0 ?? 0) >= 1 }) else {
                throw ValidationError("--shape must be N,C or N,C,H,W with positive sizes, got '\(shape)'")
            }
            // A product that overflows is too large too (no trap): multiply in Double.
            guard dims.reduce(1.0, { $0 * Double($1!) }) <= Double(1 << 30) else { throw ValidationError("--shape \(shape) is too large (at most 2^30 values)") }
        }
    }

    func loadInputs() throws -> (x: Tensor<Float>, dy: Tensor<Float>, gamma: [Float]?, beta: [Float]?) {
        var x: Tensor<Float>
        if let input {
            x = try NumpyArray(contentsOf: input).tensor()
            guard x.rank == 2 || x.rank == 4 else { throw FileFormatError(input, "expected N×C or N×C×H×W, got shape \(x.shape)") }
            guard x.shape.allSatisfy({ $0 > 0 }) else {
                throw FileFormatError(input, "shape \(x.shape) has an empty dimension; BatchNorm needs at least one sample, channel and position")
            }
            guard x.shape[0] * x.shape.dropFirst(2).reduce(1, *) >= 2 else {
                throw FileFormatError(input, "shape \(x.shape) has one value per channel; batch statistics need at least two")
            }
            if let bad = x.scalars.firstIndex(where: { !$0.isFinite }) { throw FileFormatError(input, "element \(bad) is not finite") }
        } else {
            let dims = shape!.split(separator: ",").map { Int($0.trimmingCharacters(in: .whitespaces))! }
            var random = DeterministicRandom(seed: seed, stream: [1])
            x = .normal(shape: dims, using: &random)
        }
        var dy: Tensor<Float>
        if let grad {
            dy = try NumpyArray(contentsOf: grad).tensor()
            guard dy.shape == x.shape else { throw FileFormatError(grad, "shape \(dy.shape) differs from the input's \(x.shape)") }
        } else {
            var random = DeterministicRandom(seed: seed, stream: [2])
            dy = .normal(shape: x.shape, using: &random)
        }
        func channelVector(_ path: String?) throws -> [Float]? {
            guard let path else { return nil }
            let v = try NumpyArray(contentsOf: path)
            guard v.count == x.shape[1] else { throw FileFormatError(path, "has \(v.count) values, the input has \(x.shape[1]) channels") }
            return v.scalars()
        }
        return (x, dy, try channelVector(gamma), try channelVector(beta))
    }

    func run() throws {
        let loaded = Result { try loadInputs() }
        let norm = self.norm, out = self.out, repeats = self.repetitions
        RankLaunch.run(simulateRanks: nil, command: "syncbn-bench", preflight: loaded.failure) { world in
            let inputs = try loaded.get()
            let C = inputs.x.shape[1], sampleShape = Array(inputs.x.shape.dropFirst())
            let piece = contiguousPiece(of: inputs.x.shape[0], parts: world.size, index: world.rank)
            let x = inputs.x.slice(samples: piece), dy = inputs.dy.slice(samples: piece)
            func makeLayer() -> BatchNorm<Float> {
                let layer = norm == "syncbn" ? SyncBatchNorm<Float>(featureCount: C, synchronizing: world) : BatchNorm<Float>(featureCount: C)
                if let g = inputs.gamma { layer.weight.value.scalars = g }
                if let b = inputs.beta { layer.bias.value.scalars = b }
                return layer
            }
            let layer = makeLayer()
            let y = try layer.forward(x, mode: .training)
            let dx = try layer.backward(dy)

            if let out {
                let ys = try world.allGather(y.scalars), dxs = try world.allGather(dx.scalars)
                var dgamma = layer.weight.gradient.scalars, dbeta = layer.bias.gradient.scalars
                try world.allReduceSum(&dgamma)
                try world.allReduceSum(&dbeta)
                let stats = layer.lastStatistics
                let means = try world.allGather((stats?.mean ?? []).map(Float.init))
                let variances = try world.allGather((stats?.variance ?? []).map(Float.init))
                let runningMeans = try world.allGather(layer.runningMean.value.scalars)
                let runningVars = try world.allGather(layer.runningVariance.value.scalars)
                if world.rank == 0 {
                    try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
                    func perChannel(_ parts: [[Float]]) -> Tensor<Float> {
                        norm == "syncbn" || world.size == 1 ? Tensor(shape: [C], scalars: parts[0])
                            : Tensor(shape: [world.size, C], scalars: parts.flatMap { $0.isEmpty ? [Float](repeating: .nan, count: C) : $0 })
                    }
                    let full = inputs.x.shape
                    try writeNumpy(Tensor(shape: full, scalars: ys.flatMap { $0 }), to: out + "/y.npy")
                    try writeNumpy(Tensor(shape: full, scalars: dxs.flatMap { $0 }), to: out + "/dx.npy")
                    try writeNumpy(Tensor(shape: [C], scalars: dgamma), to: out + "/dgamma.npy")
                    try writeNumpy(Tensor(shape: [C], scalars: dbeta), to: out + "/dbeta.npy")
                    try writeNumpy(perChannel(means), to: out + "/mean.npy")
                    try writeNumpy(perChannel(variances), to: out + "/var.npy")
                    try writeNumpy(perChannel(runningMeans), to: out + "/running_mean.npy")
                    try writeNumpy(perChannel(runningVars), to: out + "/running_var.npy")
                    _ = sampleShape
                }
            }

            guard repeats > 0 else {
                // One untimed pass: say what ran and where the results went.
                let stats = layer.lastStatistics
                if world.rank == 0 {
                    let meanRange = stats.map { String(format: "batch mean %.4g…%.4g, variance %.4g…%.4g", $0.mean.min() ?? 0, $0.mean.max() ?? 0,
                                                       $0.variance.min() ?? 0, $0.variance.max() ?? 0) } ?? "no statistics"
                    printTable("layer \(norm) \(inputs.x.shape.map(String.init).joined(separator: "×")) on \(world.size) rank(s): one forward and backward, \(meanRange) (rank 0's view)" + (out.map { "; outputs in \($0)" } ?? "; --out DIR writes them, --repeat K times them"))
                    printJSON(["benchmark": "layer", "norm": norm, "shape": inputs.x.shape, "ranks": world.size, "repeat": 0,
                               "out": out ?? NSNull()])
                }
                return
            }
            var times: [Double] = []
            for _ in 0..<repeats {
                try world.barrier()
                let start = DispatchTime.now().uptimeNanoseconds
                let timedLayer = makeLayer()
                _ = try timedLayer.forward(x, mode: .training)
                _ = try timedLayer.backward(dy)
                times.append(Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9)
            }
            times.sort()
            let median = times[times.count / 2]
            let bytes = Double(6 * 4 * x.count)
            let gbps = bytes / median / 1e9
            try world.barrier()
            let copy = MachineLimits.copyBandwidth()
            if world.rank == 0 {
                printTable(String(format: "layer %@ %@ on %d rank(s): median %.3f ms per forward+backward, %.2f GB/s per rank (6×4 bytes/element) = %.0f%% of the %.2f GB/s copy bandwidth measured in this run",
                                  norm, inputs.x.shape.map(String.init).joined(separator: "×"), world.size, median * 1e3, gbps, 100 * gbps / copy, copy))
                printJSON(["benchmark": "layer", "norm": norm, "shape": inputs.x.shape, "ranks": world.size, "repeat": repeats,
                           "median_s": median, "gb_per_s": gbps, "copy_gb_per_s": copy, "fraction_of_copy": gbps / copy])
            }
        }
    }
}

/// One convolution's forward and backward, timed pass by pass.
struct ConvBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "conv",
        abstract: "Time one Conv2d layer's forward and backward and compare their GFLOP/s with sgemm.",
        discussion: """
        FLOPs are 2·N·C_out·K·P per pass (K = C_in·k², P = output positions): forward, the weight gradient and \
        the input gradient each do that much multiply-add work. Times are medians of --repeat iterations after \
        two warm-up ones; each rank runs its own layer (start several ranks to measure under contention).
        """)

    @Option(help: "Input shape N,C,H,W.")
    var shape: String = "32,16,28,28"
    @Option(help: "Output channels.")
    var outChannels: Int = 16
    @Option(help: "Kernel size (square).")
    var kernel: Int = 3
    @Option(help: "Stride.")
    var stride: Int = 1
    @Option(help: "Padding (default: kernel / 2).")
    var padding: Int?
    @Option(name: .customLong("repeat"), help: "Timed iterations.")
    var repetitions: Int = 20
    @Option(help: "Convolution code: im2col (OpenBLAS's sgemm) or onednn.")
    var backend: ConvolutionBackend = .im2col
    @Option(help: "oneDNN's layout: plain (NCHW throughout) or preferred (its blocked layout, reordered at the edges).")
    var layout: String = "preferred"
    @Option(help: "oneDNN's chunk of samples (a power of two; default: the layer's own).")
    var chunk: Int?
    @Flag(help: "Backward also computes cross-iteration BN's patch statistics (Σ patch, Σ y·patch) beside dW.")
    var patchStatistics = false
    @Option(help: "Samples per leaf of the weight gradient's tree (a power of two dividing N; as syncbn-train --weight-gradient-leaf).")
    var weightGradientLeaf: Int = 1

    func dims() throws -> [Int] {
        let dims = shape.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard dims.count == 4, dims.allSatisfy({ $0 >= 1 }), dims.reduce(1.0, { $0 * Double($1) }) <= Double(1 << 28) else {
            throw ValidationError("--shape must be N,C,H,W with positive sizes (at most 2^28 elements), got '\(shape)'")
        }
        return dims
    }

    func validate() throws {
        let d = try dims()
        guard (1...4096).contains(outChannels), (1...15).contains(kernel), (1...8).contains(stride), (1...100_000).contains(repetitions) else {
            throw ValidationError("--out-channels (1…4096), --kernel (1…15), --stride (1…8) and --repeat (1…100000) must be in range")
        }
        guard ["plain", "preferred"].contains(layout) else { throw ValidationError("--layout must be plain or preferred, got '\(layout)'") }
        if let chunk, !(1...1024).contains(chunk) || chunk & (chunk - 1) != 0 {
            throw ValidationError("--chunk must be a power of two in 1…1024, got \(chunk)")
        }
        guard (1...1024).contains(weightGradientLeaf), weightGradientLeaf & (weightGradientLeaf - 1) == 0, d[0] % weightGradientLeaf == 0 else {
            throw ValidationError("--weight-gradient-leaf must be a power of two dividing N, got \(weightGradientLeaf)")
        }
        let p = padding ?? kernel / 2
        guard p >= 0 && p < kernel, d[2] + 2 * p >= kernel, d[3] + 2 * p >= kernel else {
            throw ValidationError("--padding must be in 0..<kernel and the padded input at least the kernel's size")
        }
    }

    func run() throws {
        let d = try dims(), out = outChannels, kernel = self.kernel, stride = self.stride, padding = self.padding ?? kernel / 2
        let repeats = repetitions
        RankLaunch.run(simulateRanks: nil, command: "syncbn-bench") { world in
            var random = DeterministicRandom(seed: 5, stream: [UInt64(world.rank)])
            let conv = Conv2d<Float>(inputChannels: d[1], outputChannels: out, kernelSize: kernel, stride: stride, padding: padding,
                                     bias: false, random: &random)
            conv.backend = backend
            conv.oneDNNLayout = layout == "plain" ? .plain : .preferred
            conv.oneDNNChunkOverride = chunk
            conv.providesPatchStatistics = patchStatistics
            conv.weightGradientLeaf = weightGradientLeaf
            let x = Tensor<Float>.normal(shape: d, using: &random)
            let g = try conv.geometry(for: d)
            let dy = Tensor<Float>.normal(shape: [d[0], out, g.outputHeight, g.outputWidth], using: &random)
            var forward: [Double] = [], backward: [Double] = []
            var before = OneDNNConvolution.timings
            var cpuBefore = processCPUSeconds(), wallBefore = DispatchTime.now().uptimeNanoseconds
            try world.barrier()
            for iteration in 0..<(repeats + 2) {
                if iteration == 2 {
                    before = OneDNNConvolution.timings
                    cpuBefore = processCPUSeconds()
                    wallBefore = DispatchTime.now().uptimeNanoseconds
                }
                let t0 = DispatchTime.now().uptimeNanoseconds
                _ = try conv.forward(x, mode: .training)
                let t1 = DispatchTime.now().uptimeNanoseconds
                if patchStatistics { conv.patchStatisticsReceiver = { _, _ in } }
                _ = try conv.backward(dy)
                let t2 = DispatchTime.now().uptimeNanoseconds
                if iteration >= 2 {
                    forward.append(Double(t1 - t0) * 1e-9)
                    backward.append(Double(t2 - t1) * 1e-9)
                }
            }
            let after = OneDNNConvolution.timings
            // Threads at work: 1.0 is one busy thread (a rank's share), 2.0 two (another thread running kernels).
            let cpuPerWall = (processCPUSeconds() - cpuBefore) / (Double(DispatchTime.now().uptimeNanoseconds - wallBefore) * 1e-9)
            let reorders = (activations: (after.activationReorders - before.activationReorders) / Double(repeats),
                            weights: (after.weightReorders - before.weightReorders) / Double(repeats),
                            calls: (after.total - before.total) / Double(repeats))
            let gemm = MachineLimits.gemmGFLOPs()
            let flops = 2 * Double(d[0] * out * g.patchSize * g.positions)
            let f = forward.sorted()[repeats / 2], b = backward.sorted()[repeats / 2]
            let rates = try world.allGather([flops / f / 1e9, 2 * flops / b / 1e9, 3 * flops / (f + b) / 1e9, gemm])
            if world.rank == 0 {
                let mean = (0..<4).map { i in rates.reduce(0) { $0 + $1[i] } / Double(rates.count) }
                let isa = OneDNNConvolution.cpuISA
                let code = backend == .onednn ? "onednn \(layout) chunk \(conv.oneDNNChunkSize(g)) [\(conv.oneDNNImplementations.joined(separator: ", "))]" : "im2col"
                printTable("conv backend \(code), weight-gradient leaf \(conv.weightGradientLeaf), CPU \(isa)")
                if backend == .onednn {
                    printTable(String(format: "oneDNN calls %.3f ms per forward + backward, of which reorders of activations %.3f ms and of weights %.3f ms (mean)",
                                      reorders.calls * 1e3, reorders.activations * 1e3, reorders.weights * 1e3))
                }
                printTable(String(format: "conv %@ → %d, %d×%d stride %d pad %d on %d rank(s): forward %.3f ms (%.1f GFLOP/s), backward %.3f ms (%.1f GFLOP/s), together %.1f GFLOP/s = %.0f%% of sgemm 512³ %.1f (rank 0's times, mean rates); CPU %.2f s per wall s",
                                  d.map(String.init).joined(separator: "×"), out, kernel, kernel, stride, padding, world.size, f * 1e3, mean[0],
                                  b * 1e3, mean[1], mean[2], 100 * mean[2] / mean[3], mean[3], cpuPerWall))
                printJSON(["benchmark": "conv", "shape": d, "out_channels": out, "kernel": kernel, "stride": stride, "padding": padding,
                           "ranks": world.size, "forward_s": f, "backward_s": b, "gflop_per_s": mean[2], "sgemm_gflop_per_s": mean[3],
                           "fraction_of_sgemm": mean[2] / mean[3], "backend": backend.rawValue, "cpu_isa": isa,
                           "onednn_layout": backend == .onednn ? layout : "", "onednn_chunk": backend == .onednn ? conv.oneDNNChunkSize(g) : 0,
                           "onednn_implementations": conv.oneDNNImplementations, "patch_statistics": patchStatistics,
                           "weight_gradient_leaf": conv.weightGradientLeaf, "onednn_call_s": reorders.calls,
                           "onednn_activation_reorder_s": reorders.activations, "onednn_weight_reorder_s": reorders.weights,
                           "cpu_s_per_wall_s": cpuPerWall])
            }
        }
    }
}

/// This machine's limits, measured the way the other benchmarks are compared with them.
enum MachineLimits {
    /// Copy bandwidth in GB/s counting bytes read + written: the median of `repeats` memcpy's of
    /// `bytes` (large enough to leave every cache).
    static func copyBandwidth(bytes: Int = 256 << 20, repeats: Int = 7) -> Double {
        let source = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 64)
        let target = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 64)
        defer { source.deallocate(); target.deallocate() }
        memset(source, 1, bytes)
        memset(target, 0, bytes)
        var times: [Double] = []
        for _ in 0..<repeats {
            let start = DispatchTime.now().uptimeNanoseconds
            memcpy(target, source, bytes)
            times.append(Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9)
        }
        return Double(2 * bytes) / times.sorted()[times.count / 2] / 1e9
    }

    /// sgemm GFLOP/s through the project's GEMM path on n×n×n (median of `repeats`).
    static func gemmGFLOPs(n: Int = 512, repeats: Int = 7) -> Double {
        var random = DeterministicRandom(seed: 3)
        let a = Tensor<Float>.normal(shape: [n, n], using: &random), b = Tensor<Float>.normal(shape: [n, n], using: &random)
        var c = [Float](repeating: 0, count: n * n)
        var times: [Double] = []
        for _ in 0..<repeats {
            let start = DispatchTime.now().uptimeNanoseconds
            a.scalars.withUnsafeBufferPointer { ap in
                b.scalars.withUnsafeBufferPointer { bp in
                    c.withUnsafeMutableBufferPointer { cp in
                        Float.gemm(transposeA: false, transposeB: false, m: n, n: n, k: n, alpha: 1, a: ap.baseAddress!, lda: n,
                                   b: bp.baseAddress!, ldb: n, beta: 0, c: cp.baseAddress!, ldc: n)
                    }
                }
            }
            times.append(Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9)
        }
        return 2 * Double(n * n * n) / times.sorted()[times.count / 2] / 1e9
    }
}

/// User + system CPU seconds of this process so far (all its threads).
func processCPUSeconds() -> Double {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    return Double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) + Double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) * 1e-6
}

func printJSON(_ object: [String: Any]) {
    if let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) {
        FileHandle.standardOutput.write(data + Data("\n".utf8))
    }
}

func printTable(_ line: String) {
    FileHandle.standardError.write(Data((line + "\n").utf8))
}

/// `syncbn-bench limits`: memory bandwidth and GEMM throughput, per rank.
struct Limits: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "limits",
        abstract: "Measure this machine's copy bandwidth (bytes read + written) and sgemm GFLOP/s through the project's GEMM path.")

    func run() throws {
        RankLaunch.run(simulateRanks: nil, command: "syncbn-bench") { world in
            try world.barrier()
            let copy = MachineLimits.copyBandwidth()
            let gemm = MachineLimits.gemmGFLOPs()
            let copies = try world.allGather([copy]).map { $0[0] }, gemms = try world.allGather([gemm]).map { $0[0] }
            if world.rank == 0 {
                printTable(String(format: "limits on %d rank(s) at once: copy %.2f GB/s per rank (read + write, 256 MiB memcpy), sgemm 512³ %.1f GFLOP/s per rank",
                                  world.size, copies.reduce(0, +) / Double(copies.count), gemms.reduce(0, +) / Double(gemms.count)))
                printJSON(["benchmark": "limits", "ranks": world.size, "copy_gb_per_s": copies, "sgemm_gflop_per_s": gemms])
            }
        }
    }
}

/// `syncbn-bench allreduce`: latency and bandwidth of the job's communicator.
struct AllReduceBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "allreduce",
        abstract: "Latency and bandwidth of an all-reduce(SUM) of Float32 from 8 B to 4 MiB over the job's ranks.",
        discussion: "Bandwidth is the message size divided by the median time (algorithm bandwidth).")

    @Option(help: "Timed repetitions per size (after 3 warm-up calls).")
    var repeats: Int = 50

    func validate() throws {
        guard (1...100_000).contains(repeats) else { throw ValidationError("--repeats must be between 1 and 100000, got \(repeats)") }
    }

    func run() throws {
        let repeats = self.repeats
        RankLaunch.run(simulateRanks: nil, command: "syncbn-bench") { world in
            var rows: [[String: Any]] = []
            var bytes = 8
            while bytes <= 4 << 20 {
                var values = [Float](repeating: 1, count: bytes / 4)
                for _ in 0..<3 { try world.allReduceSum(&values) }
                var times: [Double] = []
                for _ in 0..<repeats {
                    try world.barrier()
                    let start = DispatchTime.now().uptimeNanoseconds
                    try world.allReduceSum(&values)
                    times.append(Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9)
                }
                let median = times.sorted()[times.count / 2]
                rows.append(["bytes": bytes, "median_s": median, "gb_per_s": Double(bytes) / median / 1e9])
                if world.rank == 0 {
                    printTable(String(format: "allreduce %8d B on %d rank(s): %9.1f µs, %7.3f GB/s", bytes, world.size, median * 1e6, Double(bytes) / median / 1e9))
                }
                bytes *= 2
            }
            if world.rank == 0 { printJSON(["benchmark": "allreduce", "ranks": world.size, "repeat": repeats, "sizes": rows]) }
        }
    }
}

/// `syncbn-bench train`: a training step of the default model, where its time goes, for one or
/// more normalizations in the same run.
struct TrainBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "train",
        abstract: "Time training steps of a model and split them into compute, communication and data.",
        discussion: """
        For each --norm (default: bn then syncbn, so their ratio comes from one run; every other arm adds its own ratio to bn): samples/s over all ranks, \
        seconds per step split into compute / communication (time blocked in collectives) / data, peak RSS \
        per rank, the GEMM GFLOP/s achieved inside the conv layers (as a fraction of sgemm 512³ measured in \
        this run), and collectives per step. The first --warmup steps are not timed.
        """)

    @Option(help: "Comma-separated arms to compare: any --norm of syncbn-train, shufflebn (bn with --shuffle-bn) or domainbn (syncbn with --domain-bn, on two-domain:DATA unless the data has domains).")
    var norms: String = "bn,syncbn"
    @Option(help: "Model: convnet, mlp, resnet20, resnet32, resnet56, resnet110 or resnet18.")
    var model: ModelKind = .convnet
    @Option(help: "Channel multiplier of the model.")
    var width: Double = 1
    @Option(help: "Data the steps train on (as syncbn-train --data), e.g. fashion-mnist for 1×28×28 images.")
    var data: String = DataSource.defaultSynthetic.description
    @Option(help: "Samples per rank per step.")
    var batchSize: Int = 32
    @Option(help: "Timed steps.")
    var steps: Int = 60
    @Option(help: "Untimed steps first.")
    var warmup: Int = 5
    @Option(help: "Convolutions: auto, im2col, onednn or one per convolution (as syncbn-train). Default: auto, or SYNCBN_CONV_BACKEND when set.")
    var convBackend: ConvolutionBackendSetting?
    @Option(help: "Samples per leaf of each convolution's weight-gradient sum (as syncbn-train).")
    var weightGradientLeaf: Int = 1
    @Option(help: "The cbn arm's gradient: compensated (syncbn-train's default) or current (as syncbn-train --cbn-gradient).")
    var cbnGradient: CrossIterationGradient = .compensated

    func validate() throws {
        if convBackend == nil { _ = try ConvolutionBackendSetting.commandLineDefault() }
        guard norms.split(separator: ",").allSatisfy({ BenchArm(String($0)) != nil }) else {
            let kinds = NormalizationKind.allCases.map(\.rawValue).joined(separator: ", ")
            throw ValidationError("--norms must list arms among \(kinds), shufflebn and domainbn, got '\(norms)'")
        }
        guard width.isFinite && width > 0 && width <= 64 else { throw ValidationError("--width must be in (0, 64], got \(width)") }
        guard (1...65536).contains(batchSize), (1...100_000).contains(steps), (0...10_000).contains(warmup) else {
            throw ValidationError("--batch-size, --steps and --warmup must be positive and reasonable")
        }
    }

    func run() throws {
        let arms = norms.split(separator: ",").map { BenchArm(String($0))! }
        let model = self.model, batch = batchSize, steps = self.steps, warmup = self.warmup
        let source = self.data, width = self.width, leaf = weightGradientLeaf, cbnGradient = self.cbnGradient
        let backendSetting = try convBackend ?? ConvolutionBackendSetting.commandLineDefault()
        let data = Result { try DataSource.split(try DataSource(parsing: source), evaluation: nil, heldOutFraction: 0.1) }
        // Domain-specific BN's arm needs domain labels: the data followed by its shifted copy.
        let needsDomains = arms.contains(where: \.domainBN)
        let domainData = Result { () -> DataSplit? in
            guard needsDomains, try data.get().train.domains == nil else { return nil }
            return try DataSource.split(try DataSource(parsing: "two-domain:" + source), evaluation: nil, heldOutFraction: 0.1)
        }
        RankLaunch.run(simulateRanks: nil, command: "syncbn-bench", preflight: data.failure ?? domainData.failure) { world in
            let plain = try data.get(), domainSplit = try domainData.get()
            try world.barrier()   // every rank measures at once, as they will train at once
            let gemmLimit = MachineLimits.gemmGFLOPs()
            var results: [[String: Any]] = []
            var stepSeconds: [String: Double] = [:]
            for arm in arms {
                // Each arm starts without the scratch buffers of the one before,
                // so an arm's peak RSS is its own unless an earlier arm's was higher.
                Float.scratchArrays.releaseFree()
                Double.scratchArrays.releaseFree()
                let kind = arm.kind
                var c = TrainingConfiguration()
                c.model = model
                c.width = width
                c.norm = kind
                c.shuffleBN = arm.shuffleBN
                c.domainBN = arm.domainBN
                let split = arm.domainBN ? domainSplit ?? plain : plain
                c.batchSize = batch
                c.steps = warmup + steps
                c.convBackend = backendSetting
                c.weightGradientLeaf = leaf
                c.crossIteration.gradient = cbnGradient
                let trainer = try Trainer(configuration: c, data: split, world: world)
                try trainer.chooseConvolutionBackends()
                for _ in 0..<warmup { try trainer.trainStep() }
                let convs = trainer.network.convolutions.map(\.layer)
                let gemm0 = convs.reduce(0.0) { $0 + $1.gemmSeconds }, ops0 = convs.reduce(0.0) { $0 + $1.gemmOperations }
                trainer.ledger.reset()
                let data0 = trainer.dataSeconds
                try world.barrier()
                let start = DispatchTime.now().uptimeNanoseconds, cpu0 = processCPUSeconds()
                var samples = 0
                for _ in 0..<steps { samples += try trainer.trainStep().samples }
                let total = Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9
                let cpuPerWall = try world.allGather([(processCPUSeconds() - cpu0) / total]).map { $0[0] }
                let comm = trainer.ledger.blockedSeconds, dataTime = trainer.dataSeconds - data0
                let gemmSeconds = convs.reduce(0.0) { $0 + $1.gemmSeconds } - gemm0
                let gemmRate = (convs.reduce(0.0) { $0 + $1.gemmOperations } - ops0) / max(gemmSeconds, 1e-12) / 1e9
                var usage = rusage()
                getrusage(RUSAGE_SELF.rawValue, &usage)
                let rss = try world.allGather([Double(usage.ru_maxrss) / 1024]).map { $0[0] }
                let perStep = try world.allGather([total / Double(steps)]).map { $0[0] }.max()!
                stepSeconds[arm.name] = perStep
                let row: [String: Any] = [
                    "norm": arm.name, "samples_per_s": Double(samples) / total, "step_s": perStep,
                    "compute_s": (total - comm - dataTime) / Double(steps), "comm_s": comm / Double(steps), "data_s": dataTime / Double(steps),
                    "peak_rss_mib": rss, "conv_gemm_gflop_per_s": gemmRate, "conv_gemm_fraction_of_sgemm": gemmRate / gemmLimit,
                    "collectives_per_step": Double(trainer.ledger.totalCollectives) / Double(steps),
                    "cpu_s_per_wall_s": cpuPerWall,
                    "conv_backends": (trainer.convolutionBackends ?? []).listText,
                    // What tools/cost_model.py needs to predict this step on another network.
                    "gradient_bytes": 4 * trainer.network.namedParameters.reduce(0) { $0 + $1.parameter.value.count },
                    "normalization_channels": trainer.network.normalizationLayers.compactMap { $0.layer.populations.first?.featureCount },
                ]
                results.append(row)
                if world.rank == 0 {
                    if let summary = trainer.convolutionBackendSummary { printTable("train \(arm.name): convolutions \(summary)") }
                    printTable(String(format: "train %@ %@ batch %d × %d rank(s): %.0f samples/s, %.2f ms/step = compute %.2f + comm %.2f + data %.2f ms; peak RSS %.0f MiB/rank; conv GEMM %.1f GFLOP/s (%.0f%% of sgemm 512³ %.1f); %.0f collectives/step",
                                      model.rawValue, arm.name, batch, world.size, Double(samples) / total, perStep * 1e3,
                                      (total - comm - dataTime) / Double(steps) * 1e3, comm / Double(steps) * 1e3, dataTime / Double(steps) * 1e3,
                                      rss.max()!, gemmRate, 100 * gemmRate / gemmLimit, gemmLimit, Double(trainer.ledger.totalCollectives) / Double(steps)))
                }
            }
            var json: [String: Any] = ["benchmark": "train", "model": model.rawValue, "width": width, "data": source,
                                       "sample_shape": plain.train.sampleShape, "ranks": world.size, "batch_size": batch,
                                       "steps": steps, "sgemm_gflop_per_s": gemmLimit, "runs": results,
                                       "cpu_isa": OneDNNConvolution.cpuISA, "conv_backend": backendSetting.description,
                                       "weight_gradient_leaf": leaf, "cbn_gradient": cbnGradient.rawValue]
            if let bn = stepSeconds["bn"] {
                for arm in arms where arm.name != "bn" {
                    guard let other = stepSeconds[arm.name] else { continue }
                    json["\(arm.name)_over_bn"] = other / bn
                    if world.rank == 0 { printTable(String(format: "%@ step / bn step = %.3f", arm.name, other / bn)) }
                }
            }
            if world.rank == 0 { printJSON(json) }
        }
    }
}

/// One arm of `bench train`: a normalization, or ShuffleBN / domain-specific BN around BN.
struct BenchArm {
    var name: String
    var kind: NormalizationKind
    var shuffleBN = false
    var domainBN = false

    init?(_ name: String) {
        self.name = name
        switch name {
        case "shufflebn": kind = .bn; shuffleBN = true
        case "domainbn": kind = .syncbn; domainBN = true
        default:
            guard let kind = NormalizationKind(rawValue: name) else { return nil }
            self.kind = kind
        }
    }
}

/// Runs the communicator conformance suite on the job's communicator.
struct SelfTest: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "selftest",
        abstract: "Check every collective of the job's communicator against closed-form values.")

    @Option(help: "Fail unless the job has exactly this many ranks (so a group of one cannot pass by accident).")
    var expectSize: Int?

    func run() throws {
        let expected = expectSize
        RankLaunch.run(simulateRanks: nil, command: "syncbn-bench") { world in
            if let expected, world.size != expected {
                throw CommunicatorError.invalidArgument("selftest expected \(expected) ranks, the job has \(world.size)")
            }
            let failures = try CommunicatorConformance.run(world)
            let all = try world.allGather([Int64(failures.count)])
            for failure in failures { FileHandle.standardError.write(Data("selftest: \(failure)\n".utf8)) }
            let total = all.reduce(0) { $0 + $1[0] }
            if world.rank == 0 {
                print("selftest: \(type(of: world)) size \(world.size): \(total == 0 ? "all checks passed" : "\(total) failures")")
            }
            if total > 0 { throw CollectiveRunError("\(total) collective checks failed") }
        }
    }
}

SyncBNBench.mainOnce()
