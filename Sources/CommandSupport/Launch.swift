import ArgumentParser
import Collectives
import CollectivesMPI
import Foundation
import Kernels
import Training

/// How this process takes part in a job: alone, as one of N in-process ranks, or as an MPI rank.
public enum RankLaunch {
    /// Runs `body` on every rank of the job this process belongs to and handles failure the same
    /// way for every subcommand: a one-line message and exit code 2, never a trace or a hang.
    /// Collective errors (raised identically on every rank) end every rank cleanly; any other error
    /// on an MPI rank aborts the job so that the other ranks do not wait for it forever.
    ///
    /// `preflight` is an error found before the ranks started (a bad data file). Under MPI the
    /// ranks first agree, with one all-gather, whether any of them has one: then the lowest such
    /// rank prints it and every rank finalises and exits 2, so the message is never lost to a
    /// rank that exits first, and a rank whose files were fine does not wait forever.
    ///
    /// With `collectiveTimeout`, every collective from the first on — the preflight agreement
    /// included — is watched (``watched(_:timeout:command:)``), and `body` gets the watched
    /// communicator: a rank stopped or dead before the run begins ends the job too.
    public static func run(simulateRanks: Int?, command: String, preflight: Error? = nil, collectiveTimeout: Double? = nil,
                           _ body: @escaping (any Communicator) throws -> Void) -> Never {
        func watching(_ world: any Communicator) -> any Communicator {
            collectiveTimeout.map { watched(world, timeout: $0, command: command) } ?? world
        }
        World.applySpeedSettings()
        if let n = simulateRanks, n > 1 {
            if let preflight { fail(command, describe(preflight)) }
            if MPICommunicator.launchedByMPI {
                fail(command, "--simulate-ranks cannot be combined with an MPI launcher; use one or the other")
            }
            do {
                _ = try InProcessGroup.run(size: n) { comm in try body(watching(comm)) }
                exit(0)
            } catch {
                fail(command, describe(error))
            }
        }
        if MPICommunicator.launchedByMPI {
            let world: MPICommunicator
            // MPI's initialisation waits for every rank too (a rank stopped at start-up would hang it).
            let startup = collectiveTimeout.map { watchdog(timeout: $0, command: command, rankPrefix: "rank \(MPICommunicator.launcherRank): ") }
            do {
                world = try startup.map { try $0.watch("MPI initialisation") { try MPICommunicator.world() } } ?? MPICommunicator.world()
            } catch { fail(command, describe(error)) }
            do {
                let watchedWorld = watching(world)
                let flags = try watchedWorld.allGather([Int64(preflight == nil ? 0 : 1)])
                if let first = flags.firstIndex(where: { $0 == [1] }) {
                    if world.rank == first, let preflight { printError(command, describe(preflight)) }
                    MPICommunicator.finalize()
                    exit(2)
                }
                try body(watchedWorld)
                MPICommunicator.finalize()
                exit(0)
            } catch let error as CollectiveRunError {
                if world.rank == 0 { printError(command, error.description) }
                MPICommunicator.finalize()
                exit(2)
            } catch let error as CollectiveMismatchError {
                if world.rank == 0 { printError(command, error.description) }
                MPICommunicator.finalize()
                exit(2)
            } catch {
                printError(command, (world.size > 1 ? "rank \(world.rank): " : "") + describe(error))
                if world.size > 1 { MPICommunicator.abort(code: 2) }
                MPICommunicator.finalize()
                exit(2)
            }
        }
        if let preflight { fail(command, describe(preflight)) }
        do {
            try body(watching(SingleProcessCommunicator()))
            exit(0)
        } catch {
            fail(command, describe(error))
        }
    }

    /// `world` with every collective watched: one that waits longer than `timeout` seconds makes
    /// this rank print what it was waiting in and end with exit code 3 (under `mpirun`, which then
    /// ends the job), instead of waiting forever for a stopped or dead rank.
    public static func watched(_ world: any Communicator, timeout: Double, command: String) -> WatchdogCommunicator {
        WatchdogCommunicator(world, watchdog: watchdog(timeout: timeout, command: command,
                                                       rankPrefix: world.size > 1 ? "rank \(world.rank): " : ""))
    }

    /// A watchdog whose expiry prints the wait on one line, naming the rank, and exits with 3.
    static func watchdog(timeout: Double, command: String, rankPrefix: String) -> CollectiveWatchdog {
        CollectiveWatchdog(timeout: timeout) { message in
            printError(command, rankPrefix + message + String(format: " (--collective-timeout %.0f)", timeout))
            _exit(3)
        }
    }

    /// How `world` was started, for the first line of a run's output.
    public static func transportName(_ world: any Communicator) -> String {
        if let watched = world as? WatchdogCommunicator { return transportName(watched.base) }
        if let checked = world as? CheckedCommunicator { return transportName(checked.base) }
        if let instrumented = world as? InstrumentedCommunicator { return transportName(instrumented.base) }
        switch world {
        case is MPICommunicator: return "MPI"
        case is InProcessGroup: return "in-process threads"
        default: return "single process, MPI not initialised"
        }
    }

    /// Prints the message once per job (by launcher rank 0) and exits with code 2. For errors
    /// found before any collective, which every rank finds alike.
    public static func fail(_ command: String, _ message: String) -> Never {
        if MPICommunicator.launcherRank == 0 { printError(command, message) } else { letRankZeroSpeakFirst() }
        exit(2)
    }

    /// A rank other than 0 that exits with an error waits a moment first: `mpirun` ends the whole
    /// job when the first rank exits non-zero, and rank 0's message, if it has not reached
    /// `mpirun` by then, is lost.
    public static func letRankZeroSpeakFirst() {
        if MPICommunicator.launcherRank != 0 { usleep(1_500_000) }
    }

    public static func printError(_ command: String, _ message: String) {
        FileHandle.standardError.write(Data("\(command): error: \(message)\n".utf8))
    }

    /// Our errors describe themselves in one line; a Foundation error is reduced to its
    /// localized description instead of its raw dump (domain, code, user info).
    public static func describe(_ error: Error) -> String {
        let text = String(describing: error)
        guard text.contains("Error Domain=") || text.hasPrefix("CocoaError") || text.hasPrefix("POSIXError") else { return text }
        return (error as NSError).localizedDescription.split(separator: "\n").joined(separator: " ")
    }
}

extension ParsableCommand {
    /// `main()`, except that under an MPI launcher only rank 0 prints a usage error, so a bad
    /// flag gives one message per job rather than one per rank. Exit codes are ArgumentParser's.
    public static func mainOnce() -> Never {
        // The library's messages name settings by field; this command line names them by flag.
        SettingNames.commandLine = RunAgreement.flagName
        do {
            var command = try parseAsRoot()
            try command.run()
            Foundation.exit(0)
        } catch {
            if MPICommunicator.launcherRank == 0 { exit(withError: error) }
            RankLaunch.letRankZeroSpeakFirst()
            Foundation.exit(exitCode(for: error).rawValue)
        }
    }
}

extension Result {
    /// The error of a failed result, nil for a success.
    public var failure: Failure? {
        if case let .failure(error) = self { return error }
        return nil
    }
}
