# bench/plot_prefill.gp: plots of `apb bench prefill --json F` (reads F.tsv).
#   gnuplot -e "in='prefill.json.tsv'; outdir='docs'; gpus=4" bench/plot_prefill.gp
# Rows with no data for a method are simply absent from its line; a dense time of 0 (dense not run at
# that length) leaves the speedup point out.
# Writes outdir/prefill_time_<gpus>gpu.png (prefill seconds against document length, one line per
# method, log-log) and outdir/prefill_speedup_<gpus>gpu.png (dense seconds / method seconds).
if (!exists("in")) in = 'prefill.json.tsv'
if (!exists("outdir")) outdir = 'docs'
if (!exists("gpus")) gpus = 4
set terminal pngcairo size 900,600 font ",11"
set datafile separator "\t"
set key left top
set grid
set logscale xy 2
set xlabel "document tokens"
set format x "%.0s%c"
methods = "dense ring zigzag ulysses star apb star-balanced apb-balanced"
sel(m, g) = sprintf("< awk -F'\t' '$1==\"%s\" && ($2==%d || \"%s\"==\"dense\")' %s", m, g, m, in)
set output sprintf("%s/prefill_time_%dgpu.png", outdir, gpus)
set ylabel "prefill seconds"
set title sprintf("prefill time, llama3-8b shape, %d GPUs (dense: 1 GPU)", gpus)
plot for [m in methods] sel(m, gpus) using 3:4 with linespoints title m
set output sprintf("%s/prefill_speedup_%dgpu.png", outdir, gpus)
unset logscale y
set ylabel "speedup over dense on one GPU"
set title sprintf("speedup over dense, %d GPUs", gpus)
plot for [m in "ring zigzag ulysses star apb star-balanced apb-balanced"] sel(m, gpus) using 3:($5 > 0 ? $5/$4 : 1/0) with linespoints title m
