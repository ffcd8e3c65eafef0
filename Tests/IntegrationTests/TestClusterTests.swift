import Foundation
import Kernels
import TestSupport
import Training
import XCTest

/// Several machines for real, on one: `launch/test-cluster` makes two hosts (network and UTS
/// namespaces, own names and addresses in 198.18.0.0/15, a bridge), and mpirun starts their
/// daemons through the remote-shell agent, as it would through ssh. Needs root; skipped with one
/// line elsewhere. The cluster is made once for the class and removed after it (and by the next
/// `up` if this process dies).
final class TestClusterTests: XCTestCase {
    nonisolated(unsafe) static var cluster: String?
    nonisolated(unsafe) static var unavailable: String?
    var dir = ""

    static var script: String { Harness.repositoryRoot + "/launch/test-cluster" }

    override class func setUp() {
        super.setUp()
        guard getuid() == 0 else { unavailable = "launch/test-cluster needs root (network namespaces)"; return }
        do {
            let up = try runProcess(script, ["up", "2", "--owner", String(getpid())], timeout: 60)
            if up.status == 0 { cluster = up.stdout.trimmingCharacters(in: .whitespacesAndNewlines) } else {
                unavailable = up.stderr.split(separator: "\n").first.map(String.init) ?? "launch/test-cluster up failed (exit \(up.status))"
            }
        } catch { unavailable = "launch/test-cluster up: \(error)" }
    }

    override class func tearDown() {
        if let cluster { _ = try? runProcess(script, ["down", cluster], timeout: 60) }
        super.tearDown()
    }

    override func setUpWithError() throws {
        if let unavailable = Self.unavailable { throw XCTSkip(unavailable) }
        dir = temporaryDirectory("syncbn-cluster")
    }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir); super.tearDown() }

    var cluster: String { Self.cluster! }

    /// `run NAME -n RANKS [mpirun options] -- syncbn-train …` on the cluster's hosts.
    func onCluster(_ ranks: Int, _ arguments: [String], mpirunOptions: [String] = [], timeout: Double = 120) throws -> ProcessResult {
        try runProcess(Self.script, ["run", cluster, "-n", String(ranks)] + mpirunOptions + ["--", Harness.train] + arguments, timeout: timeout)
    }

    let job = ["--model", "resnet20", "--width", "0.25", "--data", "synthetic:train=256,heldout=64", "--batch-size", "4",
               "--steps", "6", "--eval-stats", "ema", "--norm", "syncbn"]

    func testTheHostsHaveTheirOwnNamesAndAddressesOnly() throws {
        let hosts = try runProcess(Self.script, ["hosts", cluster], timeout: 30).stdout.split(separator: "\n").map(String.init)
        XCTAssertEqual(hosts, ["\(cluster)-h1", "\(cluster)-h2"])
        let names = try runProcess(Self.script, ["run", cluster, "-n", "4", "--", "hostname"], timeout: 60)
        XCTAssertEqual(names.status, 0, describe(names))
        XCTAssertEqual(names.stdout.split(separator: "\n").map(String.init).sorted(), [hosts[0], hosts[0], hosts[1], hosts[1]])
        let address = try runProcess(Self.script, ["exec", cluster, hosts[1], "ip", "-4", "-o", "addr", "show", "eth0"], timeout: 30)
        XCTAssertTrue(address.stdout.contains(" 198.18."), describe(address))
        // Nothing of the cluster is on this machine's own stack.
        let mine = try runProcess("/usr/sbin/ip", ["-4", "-o", "addr"], timeout: 30)
        XCTAssertFalse(mine.stdout.contains("198.18."), mine.stdout)
    }

    /// 2 hosts × 2 ranks with TCP between the hosts give the checkpoint of 4 ranks on one host,
    /// bit for bit: the ranks compute the same things and the reductions add in the same order
    /// (the rank tree over point-to-point messages), whatever carries the bytes.
    /// Each host with its own copy of the data, as on separate machines (a bind mount in the
    /// host's mount namespace): copies that differ only in the order of two samples, far from any
    /// evenly spread record, stop the job before training in one line naming the ranks of each
    /// host; equal copies train.
    func testPerHostDataCopiesThatDifferAreFoundBeforeTraining() throws {
        let host2 = "\(cluster)-h2"
        defer { _ = try? runProcess(Self.script, ["unmount", cluster, host2], timeout: 30) }
        var state: UInt64 = 12345
        var samples = (0..<(300 * 64)).map { _ -> Float in
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return Float(state >> 40) / Float(1 << 24)
        }
        let labels = (0..<300).map { Float($0 % 10) }
        try writeNumpy(Tensor<Float>(shape: [300, 1, 8, 8], scalars: samples), to: dir + "/x.npy")
        try writeNumpy(Tensor<Float>(shape: [300], scalars: labels), to: dir + "/y.npy")
        for i in 0..<64 { samples.swapAt(101 * 64 + i, 103 * 64 + i) }   // samples 101 and 103 (labels 1 and 3) swap
        try writeNumpy(Tensor<Float>(shape: [300, 1, 8, 8], scalars: samples), to: dir + "/x-host2.npy")
        var swappedLabels = labels
        swappedLabels.swapAt(101, 103)
        try writeNumpy(Tensor<Float>(shape: [300], scalars: swappedLabels), to: dir + "/y-host2.npy")
        let arguments = ["--data", "npy:\(dir)/x.npy,\(dir)/y.npy", "--steps", "3", "--batch-size", "4", "--model", "mlp", "--eval-stats", "ema"]
        let same = try onCluster(4, arguments)
        XCTAssertEqual(same.status, 0, "one shared copy: \(describe(same))")
        for (source, target) in [("x-host2.npy", "x.npy"), ("y-host2.npy", "y.npy")] {
            let mount = try runProcess(Self.script, ["mount", cluster, host2, dir + "/" + source, dir + "/" + target], timeout: 30)
            XCTAssertEqual(mount.status, 0, describe(mount))
        }
        let differing = try onCluster(4, arguments)
        XCTAssertEqual(differing.status, 2, describe(differing))
        let errors = differing.stderr.split(separator: "\n").filter { $0.contains("error:") }
        XCTAssertEqual(errors.count, 1, describe(differing))
        XCTAssertTrue(errors.first?.contains("--data (the training set) is 270 samples of [1, 8, 8], 10 classes, content") ?? false, describe(differing))
        XCTAssertTrue(errors.first?.contains("on ranks 0,1 but") ?? false && errors.first?.contains("on ranks 2,3") ?? false, describe(differing))
        XCTAssertFalse(differing.stderr.contains("step 1/"), "stopped before training")
    }

    func testTwoHostsOverTCPGiveTheCheckpointOfFourRanksOnOneHost() throws {
        let remote = dir + "/cluster.safetensors", local = dir + "/local.safetensors"
        let a = try onCluster(4, job + ["--save", remote])
        XCTAssertEqual(a.status, 0, describe(a))
        XCTAssertTrue(a.stderr.contains("4 rank(s) (MPI)"), describe(a))
        let b = try Harness.mpi(4, Harness.train, job + ["--save", local])
        XCTAssertEqual(b.status, 0, describe(b))
        let x = try checkpointBits(remote), y = try checkpointBits(local)
        XCTAssertEqual(x.keys.sorted(), y.keys.sorted())
        XCTAssertEqual(x.keys.sorted().filter { x[$0] != y[$0] }, [], "tensors that differ between 2 hosts × 2 and 1 host × 4")
    }

    /// `--sync-group-size node` groups the ranks by their real host names (no SYNCBN_NODE_NAME):
    /// the same checkpoint as --sync-group-size 2 on one host; placing the ranks round-robin over
    /// the hosts (non-consecutive groups) is refused in one line.
    func testNodeGroupsFollowTheRealHostNames() throws {
        XCTAssertNil(ProcessInfo.processInfo.environment["SYNCBN_NODE_NAME"])
        let byNode = dir + "/node.safetensors", bySize = dir + "/size.safetensors"
        let node = try onCluster(4, job + ["--sync-group-size", "node", "--save", byNode])
        XCTAssertEqual(node.status, 0, describe(node))
        XCTAssertTrue(node.stderr.contains("statistics over 2 rank(s)"), describe(node))
        let size = try Harness.mpi(4, Harness.train, job + ["--sync-group-size", "2", "--save", bySize])
        XCTAssertEqual(size.status, 0, describe(size))
        let x = try checkpointBits(byNode), y = try checkpointBits(bySize)
        XCTAssertEqual(x.keys.sorted().filter { x[$0] != y[$0] }, [], "node groups against groups of two")
        let interleaved = try onCluster(4, job + ["--sync-group-size", "node"], mpirunOptions: ["--map-by", "node"])
        XCTAssertEqual(interleaved.status, 2, describe(interleaved))
        XCTAssertEqual(interleaved.stderr.components(separatedBy: "ranks are not consecutive").count - 1, 1, describe(interleaved))
    }

    /// `launch/train --hosts H1:2,H2:2`, as the README documents it for real machines; the only
    /// difference here is Open MPI's remote-shell agent (the cluster's, in place of ssh), set
    /// with the interfaces through OMPI_MCA_ variables by `test-cluster head`.
    func testLaunchTrainWithHostsRunsAcrossTheHosts() throws {
        let hosts = "\(cluster)-h1:2,\(cluster)-h2:2"
        let result = try runProcess(Self.script, ["head", cluster, Harness.repositoryRoot + "/launch/train", "--hosts", hosts] + job
                                    + ["--sync-group-size", "node"], timeout: 120)
        XCTAssertEqual(result.status, 0, describe(result))
        XCTAssertTrue(result.stderr.contains("4 rank(s) (MPI)") && result.stderr.contains("statistics over 2 rank(s)"), describe(result))
    }

    /// A host's link taken down mid-run (its veth, inside its namespace): the ranks that can still
    /// talk end after --collective-timeout with a line naming the collective, and the job ends
    /// (launch/train stops an mpirun still waiting for the unreachable host's daemon 20 s later),
    /// within the timeout + 30 s, exit 3. A link that is back before the timeout loses nothing:
    /// the run finishes.
    func testALinkThatGoesDownEndsTheJobAndOneThatComesBackInTimeLosesNothing() throws {
        let h2 = "\(cluster)-h2", script = Self.script
        func job(steps: Int, downAfter: Int, upAfter: Int?) throws -> ProcessResult {
            let arguments = ["--model", "resnet20", "--width", "0.25", "--data", "synthetic:train=256,heldout=64", "--batch-size", "4",
                             "--steps", String(steps), "--eval-stats", "ema", "--norm", "syncbn", "--collective-timeout", "5"]
            let train = ([Self.script, "head", cluster, Harness.repositoryRoot + "/launch/train", "--hosts", "\(cluster)-h1:2,\(h2):2"] + arguments)
                .map { "'\($0)'" }.joined(separator: " ")
            let back = upAfter.map { "sleep \($0); '\(script)' exec \(cluster) \(h2) ip link set eth0 up" } ?? "true"
            let shell = "(sleep \(downAfter); '\(script)' exec \(cluster) \(h2) ip link set eth0 down; \(back)) & \(train); status=$?; "
                + "wait; '\(script)' exec \(cluster) \(h2) ip link set eth0 up; exit $status"
            return try runProcess("/bin/sh", ["-c", shell], timeout: 240)
        }
        let cut = try job(steps: 5000, downAfter: 8, upAfter: nil)
        XCTAssertFalse(cut.timedOut, describe(cut))
        XCTAssertEqual(cut.status, 3, describe(cut))
        XCTAssertLessThan(cut.seconds, 8 + 5 + 30 + 10, "ended within the timeout + 30 s of the cut (10 s of start-up allowed): \(describe(cut))")
        XCTAssertTrue(cut.stderr.contains("no rank answered for 5 s in"), describe(cut))
        let back = try job(steps: 400, downAfter: 8, upAfter: 2)
        XCTAssertFalse(back.timedOut, describe(back))
        XCTAssertEqual(back.status, 0, describe(back))
        XCTAssertTrue(back.stderr.contains("done: held-out accuracy"), describe(back))
    }

    /// launch/slurm.sbatch in an allocation of the two hosts (Slurm's environment, and stand-ins
    /// for `scontrol show hostnames` and for `sinfo`, which reports each node's state from a file):
    /// host 2's link is cut after the first checkpoint and sinfo reports it down; the restart runs
    /// on host 1 alone, 2 ranks × 8, and ends with the uninterrupted 4-rank run's checkpoint. This
    /// is launch/train's lost host too: the script runs it on a hosts file it keeps to sinfo's
    /// word. SyncBN over all ranks (`--sync-group-size all`): the script's default node groups
    /// would cover other samples on one node (groups of 8 become 16), which the resume check
    /// refuses, as it should.
    func testTheSlurmScriptRestartsOnTheNodesLeft() throws {
        let h1 = "\(cluster)-h1", h2 = "\(cluster)-h2", script = Self.script, root = Harness.repositoryRoot
        let bin = dir + "/bin", states = dir + "/states", save = dir + "/slurm.safetensors", straight = dir + "/straight.safetensors"
        try FileManager.default.createDirectory(atPath: bin, withIntermediateDirectories: true)
        try "\(h1) idle\n\(h2) idle\n".write(toFile: states, atomically: true, encoding: .utf8)
        let stubs = [
            "scontrol": "#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && echo \"$3\" | tr ',' '\\n'\n",
            "sinfo": "#!/bin/sh\nfor a; do case $a in --nodes=*) n=${a#--nodes=} ;; esac; done\nawk -v n=\"$n\" '$1 == n { print $2 }' '\(states)'\n",
        ]
        for (name, text) in stubs {
            try text.write(toFile: bin + "/" + name, atomically: true, encoding: .utf8)
            chmod(bin + "/" + name, 0o755)
        }
        let arguments = ["--model", "resnet20", "--width", "0.25", "--data", "synthetic:train=256,heldout=64", "--batch-size", "4",
                         "--steps", "60", "--save-every", "10", "--eval-stats", "ema", "--norm", "syncbn", "--sync-group-size", "all",
                         "--collective-timeout", "5"]
        let environment = ["SYNCBN_HOME=\(root)", "PATH=\(bin):/usr/sbin:/usr/bin:/sbin:/bin", "SLURM_SUBMIT_DIR=\(dir)",
                           "SYNCBN_MAX_RESTARTS=1", "SLURM_JOB_NODELIST=\(h1),\(h2)", "SLURM_NTASKS=4", "SLURM_NTASKS_PER_NODE=2(x2)"]
        let job = ([script, "head", cluster, "/usr/bin/env"] + environment + [root + "/launch/slurm.sbatch"] + arguments + ["--save", save])
            .map { "'\($0)'" }.joined(separator: " ")
        let shell = "(while [ ! -e '\(save)' ]; do sleep 0.1; done; printf '\(h1) idle\\n\(h2) down*\\n' > '\(states)'; "
            + "'\(script)' exec \(cluster) \(h2) ip link set eth0 down) & \(job); status=$?; wait; '\(script)' exec \(cluster) \(h2) ip link set eth0 up; exit $status"
        let result = try runProcess("/bin/sh", ["-c", shell], timeout: 170)
        XCTAssertFalse(result.timedOut, describe(result))
        XCTAssertEqual(result.status, 0, describe(result))
        XCTAssertTrue(result.stderr.contains("restart 1 of 1 on 2 rank(s) (\(h1):2), 8 samples per rank (global batch 16), --resume auto"), describe(result))
        let reference = try Harness.mpi(4, Harness.train, arguments + ["--save", straight])
        XCTAssertEqual(reference.status, 0, describe(reference))
        let x = try checkpointBits(straight), y = try checkpointBits(save)
        XCTAssertEqual(x.keys.sorted(), y.keys.sorted())
        XCTAssertEqual(x.keys.sorted().filter { x[$0] != y[$0] }, [], "tensors that differ from the uninterrupted run")
    }
}
