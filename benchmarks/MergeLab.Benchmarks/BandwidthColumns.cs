using System.Globalization;
using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;

namespace MergeLab.Benchmarks;

/// <summary>A benchmark that knows how many bytes one operation moves (read plus written).</summary>
public interface IMovesBytes
{
    /// <summary>Bytes read plus bytes written by one call of <paramref name="method"/> with <paramref name="experts"/> experts.</summary>
    long BytesMoved(string method, int experts);
}

/// <summary>
/// "GB/s": bytes moved per operation (every input byte read once, every output byte written once;
/// for the copy baseline, the inputs read and written) over the mean time; "% of copy": that rate as a
/// fraction of the copy baseline's rate measured in the same run with the same parameters.
/// </summary>
public sealed class BandwidthColumn(bool fractionOfCopy) : IColumn
{
    public string Id => fractionOfCopy ? "MergeLab.CopyFraction" : "MergeLab.Bandwidth";

    public string ColumnName => fractionOfCopy ? "% of copy" : "GB/s";

    public bool AlwaysShow => true;

    public ColumnCategory Category => ColumnCategory.Custom;

    public int PriorityInCategory => fractionOfCopy ? 1 : 0;

    public bool IsNumeric => true;

    public UnitType UnitType => UnitType.Dimensionless;

    public string Legend => fractionOfCopy
        ? "GB/s as a percentage of the copy baseline's GB/s (same parameters, same run)"
        : "Bytes read plus bytes written per operation, over the mean time (10^9 bytes per second)";

    public bool IsAvailable(Summary summary) => summary.BenchmarksCases.Any(c => Rate(summary, c) is not null);

    public bool IsDefault(Summary summary, BenchmarkCase benchmarkCase) => false;

    public string GetValue(Summary summary, BenchmarkCase benchmarkCase) => GetValue(summary, benchmarkCase, SummaryStyle.Default);

    public string GetValue(Summary summary, BenchmarkCase benchmarkCase, SummaryStyle style)
    {
        if (Rate(summary, benchmarkCase) is not double rate)
        {
            return "-";
        }

        if (!fractionOfCopy)
        {
            return rate.ToString("F1", CultureInfo.InvariantCulture);
        }

        var copy = summary.BenchmarksCases.FirstOrDefault(c => c.Descriptor.WorkloadMethod.Name == "Copy"
            && c.Descriptor.Type == benchmarkCase.Descriptor.Type
            && c.Parameters.DisplayInfo == benchmarkCase.Parameters.DisplayInfo);
        return copy is not null && Rate(summary, copy) is double copyRate && copyRate > 0
            ? (100 * rate / copyRate).ToString("F0", CultureInfo.InvariantCulture) + "%"
            : "-";
    }

    private static double? Rate(Summary summary, BenchmarkCase benchmarkCase)
    {
        var report = summary[benchmarkCase];
        if (report?.ResultStatistics is not { } stats || stats.Mean <= 0
            || Activator.CreateInstance(benchmarkCase.Descriptor.Type) is not IMovesBytes moves)
        {
            return null;
        }

        int experts = benchmarkCase.Parameters.Items.FirstOrDefault(p => p.Name == "N")?.Value is int n ? n : 0;
        long bytes = moves.BytesMoved(benchmarkCase.Descriptor.WorkloadMethod.Name, experts);
        return bytes <= 0 ? null : bytes / stats.Mean; // bytes per ns = GB/s
    }
}
