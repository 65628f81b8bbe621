mod common;
use segloss::input::*;
use segloss::spec::LossSpec;
use segloss::testing::*;
#[test]
fn smoke() {
    let shape = Shape::new(2, 3, &[37, 29]);
    let mut rng = Rng::new(1);
    let z = random_logits(&mut rng, &shape, 3.0);
    let y = random_labels(&mut rng, &shape, 0.1);
    for s in [r#"{"terms":[{"kind":"cross_entropy"}]}"#, r#"{"terms":[{"kind":"dice"}]}"#] {
        let spec = LossSpec::from_json(s).unwrap();
        common::check(&spec, &shape, &z, Labels::Index(&y), s);
    }
}
