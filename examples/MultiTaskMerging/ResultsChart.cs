using System.Globalization;
using MergeLab.MultiTask;
using ScottPlot;

namespace MergeLab.Examples.MultiTaskMerging;

/// <summary>Draws the results as a PNG bar chart: each method's average test accuracy, with every
/// task's accuracy as a dot over its bar.</summary>
internal static class ResultsChart
{
    public static void Save(BenchmarkResults results, string path, int width = 1400, int height = 700)
    {
        var plot = new Plot();
        var rows = results.Rows;
        var bars = rows.Select((row, i) => new Bar
        {
            Position = i,
            Value = row.Average,
            FillColor = ColorOf(row.Method),
            Label = row.Average.ToString("F1", CultureInfo.InvariantCulture),
        }).ToArray();
        var barPlot = plot.Add.Bars(bars);
        barPlot.ValueLabelStyle.FontSize = 13;

        var xs = new List<double>();
        var ys = new List<double>();
        for (int i = 0; i < rows.Count; i++)
        {
            for (int t = 0; t < rows[i].Accuracies.Count; t++)
            {
                // Spread the task dots across the bar so they do not hide each other.
                xs.Add(i - 0.3 + 0.6 * t / Math.Max(1, rows[i].Accuracies.Count - 1));
                ys.Add(rows[i].Accuracies[t]);
            }
        }

        var dots = plot.Add.Markers(xs.ToArray(), ys.ToArray());
        dots.MarkerSize = 5;
        dots.Color = Colors.Black.WithAlpha(0.55);
        dots.LegendText = "each task (" + string.Join(", ", results.Tasks.Select(t => t.Name)) + ", left to right)";

        var ticks = rows.Select((row, i) => new Tick(i, row.Method)).ToArray();
        plot.Axes.Bottom.TickGenerator = new ScottPlot.TickGenerators.NumericManual(ticks);
        plot.Axes.Bottom.TickLabelStyle.Rotation = -35;
        plot.Axes.Bottom.TickLabelStyle.Alignment = Alignment.MiddleRight;
        plot.Axes.Bottom.TickLabelStyle.FontSize = 13;
        plot.Axes.Bottom.MinimumSize = 130;

        double low = Math.Floor((rows.SelectMany(r => r.Accuracies).Min() - 5) / 5) * 5;
        plot.Axes.SetLimitsY(Math.Max(0, low), 100);
        plot.Axes.SetLimitsX(-0.7, rows.Count - 0.3);
        plot.YLabel("test accuracy (%)");
        plot.Title($"Merging 8 Fashion-MNIST experts ({results.Options.Name} configuration): average over tasks");
        plot.ShowLegend(Edge.Bottom);
        BenchmarkResults.WriteAtomically(path, temporary => plot.SavePng(temporary, width, height));
    }

    private static Color ColorOf(string method) => method switch
    {
        "pretrained" or "individual" => Colors.Gray,
        _ when method.StartsWith("adamerging", StringComparison.Ordinal) => Colors.DarkOrange,
        _ when method.StartsWith("lines", StringComparison.Ordinal) => Colors.SeaGreen,
        _ => Colors.SteelBlue,
    };
}
