//! `gpu-bench --experts`'s second table: the routed rows' gathers at the same routing, read row
//! by row (expert order) and token-major (`ROWS_BY_TOKEN`, launch/bench/NOTES.md item 55), with
//! a check that both orders give the same bits.

use super::{median_time, CliError};
use crate::ops::routing::{combine_backward_rows, gather_rows, plan, ROWS_BY_TOKEN};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

/// `tokens` tokens of width `h` routed top-`k` of `e` experts (uniform random choices).
pub(super) fn routed_rows(
    dev: &Device,
    (tokens, k, e, h): (usize, usize, usize, usize),
    iters: usize,
) -> Result<(), CliError> {
    let f = CliError::failed;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut top = Vec::with_capacity(tokens * k);
    for _ in 0..tokens {
        let mut chosen: Vec<u32> = Vec::with_capacity(k);
        while chosen.len() < k {
            let c = rng.random_range(0..e as u32);
            if !chosen.contains(&c) {
                chosen.push(c);
            }
        }
        top.extend(chosen);
    }
    let top = Tensor::from_vec(top, (tokens, k), dev).map_err(f)?;
    let order = plan(&top, e, 0..e).map_err(f)?.order;
    let x = Tensor::randn(0f32, 1.0, (tokens, h), dev)
        .and_then(|t| t.to_dtype(DType::BF16))
        .map_err(f)?;
    let w = Tensor::rand(0f32, 1.0, (tokens, k), dev).map_err(f)?;
    let rows = (tokens * k * h * 2) as f64;
    println!("routed rows: {tokens} tokens x top-{k} of {e} experts, rows of {h} bf16");
    println!("| op | row by row ms | token-major ms | written GB/s (row by row, token-major) | same bits |");
    println!("|---|---|---|---|---|");
    let ops: [(&str, &dyn Fn() -> candle_core::Result<Tensor>); 2] = [
        ("row gather (xs = x[tokens])", &|| gather_rows(&x, &order)),
        ("combine backward rows (w · dout[tokens])", &|| {
            combine_backward_rows(&w, &order, &x, DType::BF16)
        }),
    ];
    for (name, op) in ops {
        let mut times = [0f64; 2];
        let mut outs = Vec::with_capacity(2);
        for (side, by_token) in [false, true].into_iter().enumerate() {
            let _order = ROWS_BY_TOKEN.scoped(by_token);
            times[side] = median_time(dev, iters, &|| op().map(|_| ()))?;
            outs.push(op().and_then(|t| t.to_dtype(DType::F32)).map_err(f)?);
        }
        let same = (&outs[0] - &outs[1])
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .map_err(f)?
            == 0.0;
        println!(
            "| {name} | {:.3} | {:.3} | {:.0}, {:.0} | {} |",
            times[0] * 1e3,
            times[1] * 1e3,
            rows / times[0] / 1e9,
            rows / times[1] / 1e9,
            if same { "yes" } else { "NO" }
        );
        if !same {
            return Err(CliError::Failed(format!(
                "{name}: token-major rows differ from row-by-row rows"
            )));
        }
    }
    Ok(())
}
