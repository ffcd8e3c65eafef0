import Foundation

/// Notices a collective that does not complete: a background thread checks, twice a second,
/// how long the collective in progress (if any) has been waiting, and past `timeout` calls
/// `expired` with a description — the collective, its sequence number on this rank and the
/// caller's `context` (e.g. the training step). `expired` must end the process: the waiting
/// collective cannot be interrupted, and the other ranks are stopped, dead or elsewhere.
public final class CollectiveWatchdog: @unchecked Sendable {
    public let timeout: Double
    private let lock = NSLock()
    private var current: (name: String, sequence: Int, started: UInt64)?
    private var sequence = 0
    private var contextText = ""
    private let expired: @Sendable (String) -> Void
    private let timer: DispatchSourceTimer

    public init(timeout: Double, expired: @escaping @Sendable (String) -> Void) {
        self.timeout = timeout
        self.expired = expired
        timer = DispatchSource.makeTimerSource(queue: DispatchQueue(label: "syncbn.collective-watchdog"))
        let interval = min(0.5, max(timeout / 10, 0.01))
        timer.schedule(deadline: .now() + interval, repeating: interval)
        timer.setEventHandler { [weak self] in
            guard let self, let message = self.overdue() else { return }
            self.timer.cancel()   // report once
            self.expired(message)
        }
        timer.resume()
    }

    deinit { timer.cancel() }

    /// What the program is doing, reported with a timeout (`step 12`).
    public var context: String {
        get { lock.lock(); defer { lock.unlock() }; return describeContext() }
        set { lock.lock(); contextText = newValue; location = nil; lock.unlock() }
    }

    /// Where within `context` the program is (`backward` of layer `features.1.bn`): called once
    /// per layer and pass, so it only stores; the text is put together if a timeout reports it.
    public func mark(_ pass: StaticString, _ layer: String) {
        lock.lock(); location = (pass, layer); lock.unlock()
    }
    private var location: (pass: StaticString, layer: String)?

    private func describeContext() -> String {
        guard let location else { return contextText }
        return contextText + ", \(location.pass) \(location.layer)"
    }

    func enter(_ name: String) {
        lock.lock()
        sequence += 1
        current = (name, sequence, DispatchTime.now().uptimeNanoseconds)
        lock.unlock()
    }

    func leave() { lock.lock(); current = nil; lock.unlock() }

    private func overdue() -> String? {
        lock.lock(); defer { lock.unlock() }
        guard let current else { return nil }
        let waited = Double(DispatchTime.now().uptimeNanoseconds - current.started) * 1e-9
        guard waited > timeout else { return nil }
        return String(format: "no rank answered for %.0f s in %@ (collective #%d of this rank%@): another rank is stopped, dead or in a different collective",
                      waited, current.name, current.sequence, contextText.isEmpty ? "" : ", " + describeContext())
    }

    /// Runs one blocking collective (or a start-up step that waits for the other ranks, such as
    /// MPI's initialisation) under watch.
    public func watch<R>(_ name: String, _ body: () throws -> R) rethrows -> R {
        enter(name)
        defer { leave() }
        return try body()
    }
}

/// A communicator whose every collective is watched by a ``CollectiveWatchdog``; groups split
/// from it share the watchdog.
public final class WatchdogCommunicator: Communicator {
    public let base: any Communicator
    public let watchdog: CollectiveWatchdog

    public init(_ base: any Communicator, watchdog: CollectiveWatchdog) {
        self.base = base
        self.watchdog = watchdog
    }

    public var rank: Int { base.rank }
    public var size: Int { base.size }

    public func allReduceSum<T: ReducibleScalar>(_ values: inout [T]) throws {
        try watchdog.watch("allReduceSum") { try base.allReduceSum(&values) }
    }

    public func startAllReduceSum<T: ReducibleScalar>(_ values: [T]) throws -> AllReduceRequest<T> {
        let request = try watchdog.watch("startAllReduceSum") { try base.startAllReduceSum(values) }
        let watchdog = self.watchdog
        return AllReduceRequest { try watchdog.watch("wait for a gradient all-reduce") { try request.wait() } }
    }

    public func broadcast<T: ReducibleScalar>(_ values: inout [T], root: Int) throws {
        try watchdog.watch("broadcast") { try base.broadcast(&values, root: root) }
    }

    public func allGather<T: ReducibleScalar>(_ values: [T]) throws -> [[T]] {
        try watchdog.watch("allGather") { try base.allGather(values) }
    }

    public func barrier() throws {
        try watchdog.watch("barrier") { try base.barrier() }
    }

    public func split(color: Int, key: Int) throws -> any Communicator {
        WatchdogCommunicator(try watchdog.watch("split") { try base.split(color: color, key: key) }, watchdog: watchdog)
    }
}
