fn main() {
    println!("kernex-image: under construction");
}
