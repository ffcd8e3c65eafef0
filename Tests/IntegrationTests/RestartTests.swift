import Foundation
import TestSupport
import Training
import XCTest

/// `launch/train --max-restarts`: a job that fails is started again with `--resume auto`, on the
/// hosts its hosts file names at that moment, with as many ranks as they hold at the same global
/// batch. Each job here has the harness's watchdog.
final class RestartTests: XCTestCase {
    var dir = ""
    override func setUpWithError() throws {
        guard Harness.mpirun != nil else { throw XCTSkip("mpirun is not installed (launch/setup installs it)") }
        dir = temporaryDirectory("syncbn-restart")
    }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir); super.tearDown() }

    static var launcher: String { Harness.repositoryRoot + "/launch/train" }

    func job(_ norm: String) -> [String] {
        ["--norm", norm, "--steps", "40", "--save-every", "10", "--log-every", "1", "--eval-stats", "ema", "--conv-backend", "im2col"]
    }

    /// Starts `launch/train --hosts-file` on localhost:4 with `--max-restarts 1`; at step `cut`
    /// the hosts file shrinks to localhost:2 and one rank is killed with SIGKILL.
    func killedAndRestarted(_ arguments: [String], save: String, cut: Int = 15) throws -> ProcessResult {
        let hosts = dir + "/hosts"
        try "localhost:4\n".write(toFile: hosts, atomically: true, encoding: .utf8)
        var killed = false
        let result = try runProcess(Self.launcher, ["--hosts-file", hosts, "--max-restarts", "1"] + arguments + ["--save", save],
                                    timeout: 180, killWhen: { [dir] in
            guard !killed, let log = try? String(contentsOfFile: save + ".log", encoding: .utf8), log.contains("\"step\":\(cut),") else { return false }
            killed = true
            try? "localhost:2\n".write(toFile: hosts, atomically: true, encoding: .utf8)
            if let victim = trainProcesses(matching: dir).max() { kill(victim, SIGKILL) }
            return false
        })
        XCTAssertTrue(killed, "the job never reached step \(cut): \(describe(result))")
        return result
    }

    /// 4 ranks × 32 killed at step 15 and restarted on 2 ranks × 64 from the step-10 checkpoint:
    /// the final checkpoint is the uninterrupted 4-rank run's, bit for bit, for SyncBN and for
    /// CBN (whose windows, the statistics of all ranks, move with the checkpoint).
    func testAKilledRunGoesOnWithFewerRanksAndEndsBitIdentical() throws {
        for norm in ["syncbn", "cbn"] {
            let straight = dir + "/straight-\(norm).safetensors", restarted = dir + "/restarted-\(norm).safetensors"
            let a = try Harness.mpi(4, Harness.train, job(norm) + ["--save", straight])
            XCTAssertEqual(a.status, 0, describe(a))
            let b = try killedAndRestarted(job(norm) + ["--metrics", restarted + ".log"], save: restarted)
            XCTAssertEqual(b.status, 0, describe(b))
            XCTAssertEqual(b.stderr.components(separatedBy: "restart 1 of 1 on 2 rank(s) (localhost:2), 64 samples per rank (global batch 128)").count - 1, 1, describe(b))
            XCTAssertTrue(b.stderr.contains("signal 9 (SIGKILL)") && b.stderr.contains("resumed from"), describe(b))
            let x = try checkpointBits(straight), y = try checkpointBits(restarted)
            // The 4-rank run keeps four copies of each CBN window, the 2-rank run two (all equal).
            let shared = x.keys.filter { y[$0] != nil }.sorted()
            XCTAssertEqual(Set(x.keys).subtracting(shared).filter { !$0.contains("cbn_window.rank") }, [])
            XCTAssertGreaterThan(shared.count, 20)
            XCTAssertEqual(shared.filter { x[$0] != y[$0] }, [], "\(norm): tensors that differ from the uninterrupted run")
            let (_, metadata) = try Safetensors.read(restarted)
            XCTAssertEqual(metadata["ranks"], "2")
            // The steps the restart replayed (11 to the kill) are in the history once.
            let steps = try String(contentsOfFile: restarted + ".log", encoding: .utf8).split(separator: "\n").compactMap {
                (try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]).flatMap { $0["event"] == nil ? $0["step"] as? Int : nil }
            }
            XCTAssertEqual(steps, Array(1...40), "\(norm): every training step logged once")
            XCTAssertTrue(b.stderr.contains("after step 10, the steps this resume replays, removed"), describe(b))
        }
    }

    /// Per-rank BN has no same run on fewer ranks (each rank's 32 samples would become 64): the
    /// restart is refused in one line naming the batch and not retried again; a usage error is
    /// not retried at all.
    func testWhatARestartCannotContinueIsNotRetried() throws {
        let path = dir + "/bn.safetensors"
        let bn = try killedAndRestarted(job("bn") + ["--metrics", path + ".log"], save: path)
        XCTAssertEqual(bn.status, 2, describe(bn))
        XCTAssertEqual(bn.stderr.components(separatedBy: "restart 1 of 1").count - 1, 1, describe(bn))
        XCTAssertTrue(bn.stderr.contains("--batch-size was 32 on 4 rank(s), now 64 on 2"), describe(bn))
        let usage = try runProcess(Self.launcher, ["-n", "2", "--max-restarts", "3", "--save", dir + "/u.safetensors", "--no-such-flag"], timeout: 60)
        XCTAssertEqual(usage.status, 64, describe(usage))
        XCTAssertFalse(usage.stderr.contains("restart"), describe(usage))
        let unsaved = try runProcess(Self.launcher, ["-n", "2", "--max-restarts", "1", "--steps", "2"], timeout: 60)
        XCTAssertEqual(unsaved.status, 64, describe(unsaved))
        XCTAssertEqual(unsaved.stderr, "train: --max-restarts needs --save: a restart continues from that checkpoint (write it often with --save-every)\n")
    }

    /// launch/slurm.sbatch (its mpirun route, as inside an allocation without PMIx) with
    /// SYNCBN_MAX_RESTARTS=1: a rank killed at step 15 and the step started again from the
    /// step-10 checkpoint, ending with the uninterrupted run's checkpoint.
    func testTheSlurmScriptRestartsAFailedJobStep() throws {
        let root = Harness.repositoryRoot, save = dir + "/slurm.safetensors", straight = dir + "/straight.safetensors"
        var extra = "-n 2 --oversubscribe --mca mpi_yield_when_idle 1"
        if getuid() == 0 { extra += " --allow-run-as-root" }
        var killed = false
        let arguments = job("syncbn") + ["--sync-group-size", "2"]
        let result = try runProcess(root + "/launch/slurm.sbatch", arguments + ["--save", save, "--metrics", save + ".log"],
                                    environment: ["SYNCBN_HOME": root, "SYNCBN_MPIRUN_ARGS": extra, "PATH": "/usr/bin:/bin",
                                                  "SLURM_SUBMIT_DIR": dir, "SYNCBN_MAX_RESTARTS": "1"], timeout: 180, killWhen: { [dir] in
            guard !killed, let log = try? String(contentsOfFile: save + ".log", encoding: .utf8), log.contains("\"step\":15,") else { return false }
            killed = true
            if let victim = trainProcesses(matching: dir).max() { kill(victim, SIGKILL) }
            return false
        })
        XCTAssertTrue(killed, describe(result))
        XCTAssertEqual(result.status, 0, describe(result))
        XCTAssertTrue(result.stderr.contains("restart 1 of 1, --resume auto") && result.stderr.contains("resumed from"), describe(result))
        let reference = try Harness.mpi(2, Harness.train, arguments + ["--save", straight])
        XCTAssertEqual(reference.status, 0, describe(reference))
        let x = try checkpointBits(straight), y = try checkpointBits(save)
        XCTAssertEqual(x.keys.sorted().filter { x[$0] != y[$0] }, [], "tensors that differ from the uninterrupted run")
    }

    /// launch/train's own flags are checked before mpirun starts: one `train:` line, exit 64.
    /// Found as: `-n` without a value gave `$2: unbound variable`, `--hosts localhost:1,,localhost:1`
    /// exited 1 with no output, `--hosts :2` was accepted, `--mca --steps 2` swallowed the next flag.
    func testLaunchTrainRefusesItsOwnBadFlagsInOneLine() throws {
        for (arguments, expected) in [(["-n"], "train: -n needs a value"), (["-n", "0"], "train: -n needs a positive number of ranks, got '0'"),
                                      (["--hosts", ":2"], "got ':2'"), (["--hosts", "localhost:1,,localhost:1"], "got ''"),
                                      (["--hosts", "a:0"], "SLOTS ≥ 1, got 'a:0'"), (["--mca", "--steps", "2"], "train: --mca needs a parameter name and a value"),
                                      (["--hosts", "a:1", "--hosts-file", "f"], "not both"), (["--max-restarts", "x"], "got 'x'")] {
            let result = try runProcess(Self.launcher, arguments, timeout: 60)
            XCTAssertEqual(result.status, 64, describe(result))
            XCTAssertEqual(result.stderr.split(separator: "\n").count, 1, describe(result))
            XCTAssertTrue(result.stderr.hasPrefix("train: ") && result.stderr.contains(expected), "\(arguments): \(describe(result))")
        }
    }
}
