import ArgumentParser
import Collectives
import CollectivesMPI
import Foundation
import CommandSupport
import Kernels
import Normalization
import Training

/// `syncbn-train`: data-parallel training with synchronized batch normalization.
struct SyncBNTrain: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "syncbn-train",
        abstract: "Train a CNN data-parallel over MPI with batch statistics shared across ranks.",
        discussion: """
        Run under mpirun for several processes (mpirun -n 4 syncbn-train), plainly for one, or with \
        --simulate-ranks N for N ranks as threads of one process. With no options it trains the default \
        convnet with SyncBN on the built-in synthetic data set.
        """,
        subcommands: [Train.self, Evaluate.self, RecomputeStats.self, ExportFolded.self, ExportTorch.self],
        defaultSubcommand: Train.self)
}

SyncBNTrain.mainOnce()
