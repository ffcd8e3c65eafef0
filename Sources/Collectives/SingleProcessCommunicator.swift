/// The group of one: every collective is the identity. Used when the process was not started by
/// an MPI launcher, so a plain `syncbn-train` runs without initialising MPI at all.
public final class SingleProcessCommunicator: Communicator {
    public init() {}

    public var rank: Int { 0 }
    public var size: Int { 1 }

    public func allReduceSum<T: ReducibleScalar>(_ values: inout [T]) throws {}

    public func startAllReduceSum<T: ReducibleScalar>(_ values: [T]) throws -> AllReduceRequest<T> {
        AllReduceRequest(completed: values)
    }

    public func broadcast<T: ReducibleScalar>(_ values: inout [T], root: Int) throws {
        guard root == 0 else { throw CommunicatorError.invalidArgument("broadcast root \(root) is not a rank of a group of 1") }
    }

    public func allGather<T: ReducibleScalar>(_ values: [T]) throws -> [[T]] { [values] }

    public func barrier() throws {}

    public func split(color: Int, key: Int) throws -> any Communicator {
        guard color >= 0 else { throw CommunicatorError.invalidArgument("split colour must be ≥ 0, got \(color)") }
        return SingleProcessCommunicator()
    }
}
