import Foundation
import TestSupport
import Training
import XCTest

/// Scale-out: all traffic over TCP, sync groups that follow the hosts, the Slurm script.
final class MultiNodeIntegrationTests: XCTestCase {
    var dir = ""
    override func setUp() { dir = temporaryDirectory("syncbn-multinode") }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    var root: String { Harness.repositoryRoot }

    /// mpirun's flags for this machine without `-n` (for MPMD launches and MCA choices).
    func mpirun(_ arguments: [String], timeout: Double = 120) throws -> ProcessResult {
        guard let mpirun = Harness.mpirun else { throw XCTSkip("mpirun is not installed (launch/setup installs it)") }
        var flags = ["--bind-to", "none", "-x", "OPENBLAS_NUM_THREADS=1", "--oversubscribe", "--mca", "mpi_yield_when_idle", "1"]
        if getuid() == 0 { flags.append("--allow-run-as-root") }
        return try runProcess(mpirun, flags + arguments, timeout: timeout)
    }

    func tensors(_ path: String) throws -> [String: [Float]] { try checkpointTensors(path) }

    let job = ["--model", "resnet20", "--width", "0.25", "--data", "synthetic:train=256,heldout=64", "--batch-size", "4",
               "--steps", "6", "--eval-stats", "ema"]

    func testATCPOnlyJobEqualsTheSharedMemoryJob() throws {
        // ob1 with an explicit transport list: vader (shared memory) or TCP over loopback.
        let shared = dir + "/shared.safetensors", tcp = dir + "/tcp.safetensors"
        let a = try mpirun(["--mca", "pml", "ob1", "--mca", "btl", "vader,self", "-n", "4", Harness.train] + job + ["--save", shared])
        XCTAssertEqual(a.status, 0, describe(a))
        let b = try mpirun(["--mca", "pml", "ob1", "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", "lo",
                            "-n", "4", Harness.train] + job + ["--save", tcp])
        XCTAssertEqual(b.status, 0, describe(b))
        let (x, y) = (try tensors(shared), try tensors(tcp))
        XCTAssertEqual(Set(x.keys), Set(y.keys))
        for (name, values) in x { XCTAssertEqual(values, y[name], "\(name) differs between shared memory and TCP") }
        // The transport list is what carries the traffic: with none between processes there is no job.
        let none = try mpirun(["--mca", "pml", "ob1", "--mca", "btl", "self", "-n", "4", Harness.train] + job)
        XCTAssertNotEqual(none.status, 0, describe(none))
        XCTAssertFalse(none.timedOut)
    }

    /// Four ranks on two "hosts" (SYNCBN_NODE_NAME stands in for the host name): node groups are
    /// groups of two, identical to --sync-group-size 2; placements that do not give equal,
    /// consecutive groups are one-line errors.
    func testNodeSyncGroupsFollowTheHosts() throws {
        func mpmd(_ hosts: [String], _ extra: [String]) -> [String] {
            hosts.enumerated().flatMap { index, host in
                (index == 0 ? [] : [":"]) + ["-n", "1", "-x", "SYNCBN_NODE_NAME=\(host)", Harness.train] + job + extra
            }
        }
        let byNode = dir + "/node.safetensors", bySize = dir + "/size.safetensors"
        let node = try mpirun(mpmd(["a", "a", "b", "b"], ["--sync-group-size", "node", "--save", byNode]))
        XCTAssertEqual(node.status, 0, describe(node))
        XCTAssertTrue(node.stderr.contains("statistics over 2 rank(s)"), node.stderr)
        let size = try mpirun(["-n", "4", Harness.train] + job + ["--sync-group-size", "2", "--save", bySize])
        XCTAssertEqual(size.status, 0, describe(size))
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: byNode)), try Data(contentsOf: URL(fileURLWithPath: bySize)),
                       "the checkpoints (configuration included) are byte-identical")
        for (hosts, expected) in [(["a", "b", "a", "b"], "ranks are not consecutive"), (["a", "a", "a", "b"], "different numbers of ranks (3, 1)")] {
            let result = try mpirun(mpmd(hosts, ["--sync-group-size", "node"]))
            XCTAssertEqual(result.status, 2, describe(result))
            XCTAssertEqual(result.stderr.components(separatedBy: expected).count - 1, 1, "printed once: \(result.stderr)")
        }
    }

    /// launch/slurm.sbatch outside Slurm takes its mpirun route (what runs inside an allocation
    /// without PMIx) and syncs within the node.
    func testTheSlurmScriptRunsTheJob() throws {
        guard Harness.mpirun != nil else { throw XCTSkip("mpirun is not installed (launch/setup installs it)") }
        var extra = "-n 2 --oversubscribe --mca mpi_yield_when_idle 1"
        if getuid() == 0 { extra += " --allow-run-as-root" }
        let result = try runProcess(root + "/launch/slurm.sbatch", ["--steps", "3", "--metrics", dir + "/m.jsonl"],
                                    environment: ["SYNCBN_HOME": root, "SYNCBN_MPIRUN_ARGS": extra, "PATH": "/usr/bin:/bin", "SLURM_SUBMIT_DIR": dir],
                                    timeout: 120)
        XCTAssertEqual(result.status, 0, describe(result))
        XCTAssertTrue(result.stderr.contains("statistics over 2 rank(s)), 2 rank(s)"), result.stderr)
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir + "/m.jsonl"))
        // Norms without cross-rank statistics run too: the script adds no node group for them.
        for norm in ["gn", "bn"] {
            let other = try runProcess(root + "/launch/slurm.sbatch", ["--steps", "2", "--norm", norm, "--model", "mlp"],
                                       environment: ["SYNCBN_HOME": root, "SYNCBN_MPIRUN_ARGS": extra, "PATH": "/usr/bin:/bin", "SLURM_SUBMIT_DIR": dir],
                                       timeout: 120)
            XCTAssertEqual(other.status, 0, "--norm \(norm): \(describe(other))")
        }
    }

    /// The multi-node scripts' default group: `--sync-group-size node` for the norms that take a
    /// group, none for the others, and never over a group the user gave.
    func testTheScriptsAddANodeGroupOnlyWhereTheNormTakesOne() throws {
        let cases: [([String], String)] = [
            ([], "--sync-group-size node"), (["--norm", "cbn"], "--sync-group-size node"), (["--norm=mabn"], "--sync-group-size node"),
            (["--norm", "bn"], ""), (["--norm", "bn", "--shuffle-bn"], "--sync-group-size node"), (["--norm", "gn"], ""),
            (["--norm", "in"], ""), (["--norm", "ln"], ""), (["--norm", "wn"], ""), (["--norm", "wn-meanonly"], "--sync-group-size node"),
            (["--sync-group-size", "2"], ""), (["--norm", "syncbn", "--sync-group-size=4"], ""),
        ]
        for (arguments, expected) in cases {
            let result = try runProcess("/bin/bash", ["-c", ". \"$1\"; shift; node_groups \"$@\"; echo \"${group[*]}\"", "bash",
                                                      root + "/launch/restart-policy.bash"] + arguments, timeout: 20)
            XCTAssertEqual(result.status, 0, describe(result))
            XCTAssertEqual(result.stdout.trimmingCharacters(in: .whitespacesAndNewlines), expected, "\(arguments)")
        }
    }
}
