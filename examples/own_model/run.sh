# In a folder holding mymodels.py, make_data.py, train.py, certify.py and analyse.py:
python make_data.py
python train.py
python certify.py
python analyse.py
lrnn info --model mymodels.py:MyRNN --weights my-rnn.pt
lrnn audit --model mymodels.py:MyRNN --weights my-rnn.pt --data mydata.npz --out cli-audit --quiet
lrnn robustness --model mymodels.py:MyRNN --weights my-rnn.pt --data mydata.npz --input-noise 0,0.5 --param-noise 0,0.5 --recurrent-only --seeds 3 --out sweep.csv --quiet
