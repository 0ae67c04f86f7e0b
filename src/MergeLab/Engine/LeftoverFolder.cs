namespace MergeLab.Engine;

/// <summary>A hidden folder a stopped merge left beside its output (<see cref="CheckpointMerger.FindLeftovers"/>).</summary>
/// <param name="Path">The folder's full path (<c>PARENT/.NAME.mergelab-&lt;id&gt;</c>, with <c>.old</c> at the end
/// for a moved-aside output).</param>
/// <param name="IsPreviousOutput">True: an earlier output that an overwriting merge moved aside and could not
/// move back (move it back or delete it). False: a merge's unfinished output (delete it).</param>
public sealed record LeftoverFolder(string Path, bool IsPreviousOutput);
